"""Why the toy model's cross-attention does (not) localize: measurements on one pipeline.

    python -m daamlib.toyworld.diagnostics [--model DIR] [--seeds 8] [--dataset-dir DIR]

* :func:`embedding_cosines`: the contextual embeddings of the class and background words in
  "a {word} in an urban environment" and their keys after a mid-block and a highest-resolution
  ``to_k``, summarised as the mean off-diagonal cosine. Near 1 means every word gets the same
  key, so the softmax over tokens is flat and no word can win a region.
* :func:`quick_check`: DAAM max mIoU and prompt fidelity on a few seeds per class, and the share of
  the linear (open-vocabulary) map's mass on the right label for background words.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import labels as L

TEMPLATE = "a {word} in an urban environment"
# The phrase each word is placed in, and the word whose last token is measured.
CLASS_PHRASES = {"car": "car", "person": "person", "light": "traffic light", "rider": "rider"}
BACKGROUND_WORDS = ("tree", "road", "sidewalk", "building", "sky")
# Background word -> the annotator label it should fall on.
BACKGROUND_LABELS = {"tree": L.VEGETATION, "road": L.ROAD, "sidewalk": L.SIDEWALK, "building": L.BUILDING, "sky": L.SKY}


def diagnostic_words() -> dict[str, str]:
    """Measured word -> the phrase put in the template (class words, then background words)."""
    return {**CLASS_PHRASES, **{word: word for word in BACKGROUND_WORDS}}


@torch.no_grad()
def word_embeddings(text_encoder, tokenizer, words: dict[str, str], template: str = TEMPLATE) -> torch.Tensor:
    """Contextual embedding of each word's last token in ``template``.  [W, d_text]"""
    vectors = []
    for word, phrase in words.items():
        prompt = template.format(word=phrase)
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
        word_ids = tokenizer(word, add_special_tokens=False).input_ids
        position = _last_position(ids, word_ids)
        hidden = text_encoder(torch.tensor([ids], device=text_encoder.device)).last_hidden_state[0]  # [77, d]
        vectors.append(hidden[position].float().cpu())
    return torch.stack(vectors)


def _last_position(ids: list[int], word_ids: list[int]) -> int:
    """Index of the last token of the first occurrence of ``word_ids`` in ``ids``."""
    for start in range(len(ids) - len(word_ids) + 1):
        if ids[start : start + len(word_ids)] == word_ids:
            return start + len(word_ids) - 1
    raise ValueError(f"tokens {word_ids} not in {ids}")


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine of vectors [W, d].  [W, W]"""
    unit = torch.nn.functional.normalize(vectors.float(), dim=-1)
    return unit @ unit.T


def mean_offdiagonal(matrix: torch.Tensor) -> float:
    count = matrix.shape[0]
    return float((matrix.sum() - matrix.diagonal().sum()) / (count * (count - 1)))


def key_projections(unet) -> dict[str, torch.nn.Linear]:
    """The cross-attention ``to_k`` of the mid block and of the highest-resolution down block."""
    return {"mid to_k": unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_k,
            "highest-res to_k": unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k}


@torch.no_grad()
def embedding_cosines(text_encoder, tokenizer, unet=None) -> dict[str, object]:
    """Mean off-diagonal cosine of the words' embeddings (and of their keys when ``unet`` is given),
    and the embeddings' full cosine matrix as a DataFrame."""
    words = diagnostic_words()
    vectors = word_embeddings(text_encoder, tokenizer, words)  # [W, d_text]
    matrix = cosine_matrix(vectors)
    result: dict[str, object] = {"embedding": mean_offdiagonal(matrix),
                                 "class words": mean_offdiagonal(matrix[:4, :4])}
    if unet is not None:
        for name, projection in key_projections(unet).items():
            keys = projection(vectors.to(projection.weight.device, projection.weight.dtype))  # [W, inner]
            result[name] = mean_offdiagonal(cosine_matrix(keys))
    result["matrix"] = pd.DataFrame(matrix.numpy(), index=list(words), columns=list(words))
    return result


def pipeline_cosines(pipe) -> dict[str, object]:
    return embedding_cosines(pipe.text_encoder, pipe.tokenizer, pipe.unet)


def format_cosines(result: dict[str, object]) -> str:
    parts = [f"{name} {value:.3f}" for name, value in result.items() if name != "matrix"]
    return "mean off-diagonal cosine: " + ", ".join(parts)


# -- quick check ---------------------------------------------------------------------------------
def quick_check(pipe, annotator, dataset_dir: Path, seeds: int = 8) -> dict[str, object]:
    """DAAM max mIoU, best τ and prompt fidelity on ``seeds`` images per class (30 PNDM steps), and the
    open-vocabulary (linear) map's mass share on the right label for the background words."""
    from ..experiments import build_dataset, class_curves, heatmap_method, prompt_fidelity
    from ..experiments.dataset import annotate_toy_dataset

    dataset = build_dataset(pipe, dataset_dir, L.MAIN_CLASSES, range(seeds), linear=True, progress=True)
    shares = annotate_toy_dataset(dataset, annotator)
    daam_table = class_curves(dataset, heatmap_method("daam")).summary()
    return {"daam": daam_table, "fidelity": prompt_fidelity(shares), "openvocab": openvocab_shares(dataset, pipe)}


def openvocab_shares(dataset, pipe) -> pd.DataFrame:
    """Per background word: mean share of its normalised linear map's mass on its label, and that
    label's mean pixel share (what a flat map would get), over every image of ``dataset``."""
    from PIL import Image

    from ..methods.linear import linear
    from ..plotting import heatmap_at_image

    rows = []
    for _, row in dataset.manifest.iterrows():
        labels = np.asarray(Image.open(dataset.directory / "labels" / f"{row['name']}.png"))  # [S, S]
        record = dataset.record(row)
        for word, label in BACKGROUND_LABELS.items():
            heatmap = heatmap_at_image(linear(record, word, pipe=pipe), labels.shape)  # [S, S] in [0, 1]
            rows.append({"word": word, "mass share": float(heatmap[labels == label].sum() / max(heatmap.sum(), 1e-8)),
                         "area share": float((labels == label).mean())})
    return pd.DataFrame(rows).groupby("word", sort=False).mean()


def main(argv=None) -> None:
    from ..models import load_pipeline, toy_model_dir
    from .annotator import Annotator

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="pipeline directory (default: the shipped toy model)")
    parser.add_argument("--seeds", type=int, default=0, help="images per class for the quick check (0: cosines only)")
    parser.add_argument("--dataset-dir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = args.model or toy_model_dir()
    pipe = load_pipeline(model_dir, device="cpu", progress_bar=False)
    print(format_cosines(pipeline_cosines(pipe)))
    if args.seeds:
        from .report import model_fingerprint
        from ..models import data_dir

        dataset_dir = args.dataset_dir or data_dir() / "cache" / "toyworld-quick" / model_fingerprint(model_dir)
        annotator_dir = model_dir / "annotator" if (model_dir / "annotator").exists() else toy_model_dir() / "annotator"
        result = quick_check(pipe, Annotator.from_pretrained(annotator_dir), dataset_dir, args.seeds)
        print(result["daam"].to_string(), result["fidelity"].to_string(), result["openvocab"].to_string(), sep="\n\n")


if __name__ == "__main__":
    main()
