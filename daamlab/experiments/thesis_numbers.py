"""The thesis' own results on Stable Diffusion 2-base (4 classes × 50 images), for side-by-side tables."""

from __future__ import annotations

import pandas as pd

CLASSES = ["car", "person", "traffic light", "rider", "All"]

# Table 4.2: max mIoU (%), and Table 4.3: AUC (%). Columns: method × optimized.
MAX_MIOU = pd.DataFrame(
    {("DAAM", "not optimized"): [82.5, 36.2, 71.1, 31.0, 53.2],
     ("Linear DAAM", "not optimized"): [41.7, 37.4, 68.2, 21.3, 38.3],
     ("DAAM", "optimized"): [86.0, 71.6, 72.5, 47.6, 67.3],
     ("Linear DAAM", "optimized"): [85.8, 71.3, 72.3, 43.1, 66.6]},
    index=CLASSES,
)
AUC = pd.DataFrame(
    {("DAAM", "not optimized"): [39.7, 13.8, 43.3, 15.6, 28.1],
     ("Linear DAAM", "not optimized"): [23.7, 15.4, 38.3, 11.0, 22.1],
     ("DAAM", "optimized"): [51.6, 36.6, 42.8, 23.5, 38.6],
     ("Linear DAAM", "optimized"): [51.5, 41.3, 42.7, 22.5, 39.5]},
    index=CLASSES,
)
# Table 4.1: Linear DAAM optimization, max mIoU (%) on train and test, by training images per class.
LINEAR_OPTIMIZATION = pd.DataFrame(
    {(1, "train"): [88.4, 65.1, 88.3, 41.1, 69.8], (1, "test"): [85.9, 70.0, 69.7, 38.6, 63.1],
     (2, "train"): [86.1, 65.5, 70.3, 50.7, 69.8], (2, "test"): [86.0, 71.8, 72.2, 47.8, 67.3],
     (5, "train"): [86.3, 65.7, 70.3, 47.4, 63.6], (5, "test"): [86.6, 70.9, 70.3, 38.7, 65.4]},
    index=CLASSES,
)
