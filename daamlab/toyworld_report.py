"""Measure the shipped toy model and write ``docs/toyworld.md`` with its figures.

    python -m daamlab.toyworld_report [--seeds 50] [--dataset-dir DIR | --run-dir papermill_runs/toy-full/<stamp>]

It builds the thesis dataset on the toy model (4 classes × seeds, PNDM 30 steps), labels it with
the annotator, and measures prompt fidelity, DAAM's max mIoU per class, where each class word's
attention falls among the annotator's labels (rider vs bicycle, light vs pole), and the share of
background words' open-vocabulary (linear) maps on their labels. With ``--run-dir`` it reads a
finished ``toy-full`` run of this model: its dataset, and its summary (notebook 06) for whether
optimized tokens beat the unoptimized maps. Each goal of the toy model is marked met or missed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from daamlab.experiments import build_dataset, class_curves, prompt_fidelity
from daamlab.experiments.dataset import ThesisDataset, annotate_toy_dataset
from daamlab.experiments.thesis_numbers import MAX_MIOU
from daamlab import data_dir
from daamlib.models import load_pipeline, toy_model_dir
from daamlab.plotting import examples_grid, heatmap_at_image
from daamlib.methods import DAAM, LinearDAAM, daam
from daamlab.toyworld import labels as L
from daamlab.toyworld.annotator import Annotator
from daamlab.toyworld.diagnostics import BACKGROUND_LABELS, format_cosines, pipeline_cosines

THESIS_SD2_MAX_MIOU = MAX_MIOU[("DAAM", "not optimized")].to_dict()  # Table 4.2, one source


def attention_mass_by_label(dataset: ThesisDataset) -> pd.DataFrame:
    """Per class, the mean share of the class word's (normalised) DAAM mass on each annotator label."""
    rows = []
    for _, row in dataset.manifest.iterrows():
        labels = np.asarray(Image.open(dataset.directory / "labels" / f"{row['name']}.png"))
        heatmap = heatmap_at_image(daam(dataset.record(row), row["word"]), labels.shape)
        total = heatmap.sum()
        rows.append({"class_name": row["class_name"],
                     **{L.NAMES[label]: float(heatmap[labels == label].sum() / total) for label in L.NAMES}})
    return pd.DataFrame(rows).groupby("class_name", sort=False).mean()


def label_mass_shares(dataset, method) -> pd.DataFrame:
    """Per background word: mean share of ``method``'s (min-max scaled) map mass on the word's label, and that
    label's mean pixel share (what a flat map would get), over every image of ``dataset``."""
    rows = []
    for _, row in dataset.manifest.iterrows():
        labels = np.asarray(Image.open(dataset.directory / "labels" / f"{row['name']}.png"))  # [S, S]
        record = dataset.record(row)
        for word, label in BACKGROUND_LABELS.items():
            heatmap = heatmap_at_image(method.attribute(record, word).heatmap, labels.shape)  # [S, S] in [0, 1]
            rows.append({"word": word, "mass share": float(heatmap[labels == label].sum() / max(heatmap.sum(), 1e-8)),
                         "area share": float((labels == label).mean())})
    return pd.DataFrame(rows).groupby("word", sort=False).mean()


def openvocab_shares(dataset, pipe) -> pd.DataFrame:
    """``label_mass_shares`` of the open-vocabulary (linear) maps of words that are not in the prompt."""
    return label_mass_shares(dataset, LinearDAAM(pipe))


def examples_figure(dataset: ThesisDataset, path: Path, per_class: int = 3) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = examples_grid(dataset, {"DAAM": DAAM()}, per_class=per_class)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def measure(seeds: int, dataset_dir: Path, figure_path: Path) -> dict:
    pipe = load_pipeline(device="cpu", progress_bar=False)
    dataset = build_dataset(pipe, dataset_dir, L.MAIN_CLASSES, range(seeds), linear=True)
    annotator = Annotator.from_pretrained(toy_model_dir() / "annotator")
    shares = annotate_toy_dataset(dataset, annotator)
    fidelity = prompt_fidelity(shares)
    table = class_curves(dataset, DAAM()).summary()
    mass = attention_mass_by_label(dataset)
    examples_figure(dataset, figure_path)
    cosines = pipeline_cosines(pipe)
    return {"fidelity": fidelity, "daam": table, "mass": mass, "shares": shares, "cosines": cosines,
            "openvocab": openvocab_shares(dataset, pipe)}


def run_summary(run_dir: Path) -> dict:
    """Max mIoU (percent) by method and class from a finished toy-full run's summary notebook (06)."""
    path = run_dir / "results" / "06_summary.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: pass the directory of a finished toy-full run "
                                "(python -m daamlab.runs toy-full), or leave --run-dir out")
    return json.loads(path.read_text())["max_miou_percent"]


def run_minutes(run_dir: Path) -> float:
    """Minutes a toy-full run spent in its notebooks: every timed attempt (``attempts.json``), resumed ones too."""
    from daamlab.runs import ATTEMPTS_FILE

    attempts = json.loads((run_dir / ATTEMPTS_FILE).read_text())
    return sum(attempt["seconds"] for tries in attempts.values() for attempt in tries) / 60


def model_size_mb(directory: Path) -> float:
    return sum(path.stat().st_size for path in directory.rglob("*.safetensors")) / 2**20


def write_report(results: dict, path: Path, figure_path: Path) -> None:
    training = json.loads((toy_model_dir() / "training.json").read_text())
    reports = training["reports"]
    config = training["config"]
    daam_table = results["daam"]
    lines = [
        "# The toy urban world",
        "",
        "The embedded default model of daamlib: a Stable Diffusion pipeline (AutoencoderKL, UNet2DConditionModel",
        "with cross-attention at three resolutions plus the mid block, CLIPTextModel, the CLIP BPE tokenizer, PNDM",
        "at 30 steps) trained from scratch on procedural urban scenes by `python -m daamlab.toyworld.train`,",
        "and its ground-truth annotator. This page is written by `python -m daamlab.toyworld_report`.",
        "",
        "## Model and training",
        "",
        f"- Image size {config['architecture']['image_size']}×{config['architecture']['image_size']} (latent "
        f"{config['architecture']['image_size'] // 4}×{config['architecture']['image_size'] // 4}×4). The target was "
        "128×128; the model was trained on a 2-core CPU (no GPU was available to the session), where 128×128 "
        "(32×32 latents) cost 3.4 s per UNet step of 16 images against 1.0 s per step of 32 images at 64×64.",
        f"- UNet channels {config['architecture']['unet_channels']}, text encoder {config['architecture']['text_layers']} "
        f"layers × {config['architecture']['text_hidden_size']} over the 49408-token CLIP vocabulary; VAE channels "
        f"{config['architecture']['vae_channels']}.",
        f"- Weights on disk (fp16 safetensors, pipeline + annotator): {model_size_mb(toy_model_dir()):.1f} MB.",
        f"- Hardware: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, device "
        f"`{training['device']}`, torch {training['torch']}.",
        f"- Training data: {config['num_scenes']} rendered scenes (seeds 0-{config['num_scenes'] - 1}), rendered at twice "
        "the size and block-averaged; captions from `daamlab.toyworld.captions` (10 % dropped for guidance).",
        "",
        "| stage | steps | batch | minutes | final loss |",
        "|---|---|---|---|---|",
    ]
    batch_sizes = {"vae": config["vae_batch_size"], "textenc": config.get("textenc_batch_size")}
    for stage in ("vae", "annotator", "textenc", "unet"):
        if stage in reports:
            report = reports[stage]
            loss = report.get("final_loss", float("nan"))
            batch = batch_sizes.get(stage, config["batch_size"])
            lines.append(f"| {stage} | {report['steps']} | {batch} | {report['seconds'] / 60:.1f} | {loss:.4f} |")
    lines += [""] + [f"- {stage}: {reports[stage]['note']}" for stage in ("vae", "annotator", "textenc", "unet")
                     if "note" in reports.get(stage, {})]
    lines += ["", f"Shipped UNet/text-encoder weights: {reports.get('unet', {}).get('exported_weights', 'ema')}."]
    annotator = reports.get("annotator", {})
    lines += [
        "",
        "## Ground-truth annotator",
        "",
        f"IoU on {annotator.get('held_out_scenes', '?')} held-out rendered scenes (seeds from 1 000 000, pixels pooled "
        "over the set):",
        "",
        "| class | IoU |", "|---|---|",
        *[f"| {name} | {value:.3f} |" for name, value in annotator.get("iou", {}).items()],
        f"| **mean** | **{annotator.get('miou', float('nan')):.3f}** |",
        "",
        "## Prompt fidelity",
        "",
        "Share of images of \"a {class} in an urban environment\" (seeds 0-49) in which the annotator finds the class "
        "on at least 1 % of the pixels:",
        "",
        "| class | fidelity | median class share |", "|---|---|---|",
    ]
    shares = results["shares"]
    for class_name, value in results["fidelity"].items():
        median = shares[shares["class_name"] == class_name]["share"].median()
        lines.append(f"| {class_name} | {value:.0%} | {median:.1%} |")
    lines += [
        "",
        "## DAAM on the class word",
        "",
        "Thesis aggregation (sum over steps, layers and heads, bilinear), max over τ of mIoU against the annotator's "
        "masks, beside the thesis' SD 2-base numbers (Table 4.2):",
        "",
        "| class | toy max mIoU | best τ | AUC | thesis SD 2-base |", "|---|---|---|---|---|",
    ]
    for class_name, row in daam_table.iterrows():
        best_tau = "" if np.isnan(row["best_tau"]) else f"{row['best_tau']:.2f}"
        lines.append(f"| {class_name} | {100 * row['max_miou']:.1f} | {best_tau} | {100 * row['auc']:.1f} | "
                     f"{THESIS_SD2_MAX_MIOU.get(class_name, float('nan')):.1f} |")
    lines += ["", *_targets(results, annotator)]
    if "cosines" in results:
        cosines = results["cosines"]
        lines += [
            "",
            "### How alike the words' keys are",
            "",
            "Mean off-diagonal cosine between the contextual embeddings of car, person, light, rider, tree, road, "
            "sidewalk, building and sky in \"a {word} in an urban environment\" (`daamlab.toyworld.diagnostics`), "
            "and between their keys after the mid block's and the highest-resolution block's `to_k`; near 1, "
            "the softmax over tokens cannot single a word out:",
            "",
            "| embedding | class words only | mid `to_k` | highest-resolution `to_k` |", "|---|---|---|---|",
            f"| {cosines['embedding']:.3f} | {cosines['class words']:.3f} | {cosines['mid to_k']:.3f} | "
            f"{cosines['highest-res to_k']:.3f} |",
        ]
    openvocab = results["openvocab"]
    lines += [
        "",
        "### Words not in the prompt",
        "",
        "Mean share of a background word's min-max scaled linear (open-vocabulary) map on its label, over every image, "
        "beside the label's share of the pixels (what a flat map gets):",
        "",
        openvocab.map(lambda v: f"{v:.2f}").to_markdown(),
    ]
    mass = results["mass"]
    lines += [
        "",
        "### Where the attention falls",
        "",
        "Mean share of the class word's normalised DAAM mass on each annotator label:",
        "",
        mass[["car", "person", "rider", "bicycle", "traffic light", "pole", "road", "sidewalk", "building", "sky",
              "vegetation"]].map(lambda v: f"{v:.2f}").to_markdown(),
        "",
        f"![examples]({figure_path.relative_to(path.parent).as_posix()})",
        "",
    ]
    path.write_text("\n".join(lines) + _kept_section(path))


KEPT_HEADING = "## Ablations"


def _kept_section(path: Path) -> str:
    """The page's hand-written ablation section (from ``KEPT_HEADING`` to the end), which a rewrite keeps."""
    if not path.exists():
        return ""
    text = path.read_text()
    start = text.find("\n" + KEPT_HEADING)
    return "" if start < 0 else text[start:]


GOAL_MEAN_MIOU, GOAL_CLASS_MIOU, GOAL_BEST_TAU, GOAL_OPENVOCAB_SHARE, GOAL_FIDELITY = 45.0, 35.0, 0.7, 0.5, 0.95
MAX_WEIGHTS_MB, MAX_TOY_FULL_MINUTES = 30.0, 30.0


def _targets(results: dict, annotator: dict) -> list[str]:
    """The toy model's goals, each marked met or missed."""
    fidelity, table, classes = results["fidelity"], results["daam"], list(results["fidelity"].index)
    miou, weights_mb = 100 * table["max_miou"], model_size_mb(toy_model_dir())
    checks = [
        (f"annotator mIoU ≥ 0.90 on held-out scenes: {annotator.get('miou', float('nan')):.3f}", annotator.get("miou", 0) >= 0.90),
        *[(f"prompt fidelity ≥ {GOAL_FIDELITY:.0%} for {name}: {value:.0%}", value >= GOAL_FIDELITY)
          for name, value in fidelity.items()],
        (f"weights ≤ {MAX_WEIGHTS_MB:.0f} MB: {weights_mb:.1f} MB", weights_mb <= MAX_WEIGHTS_MB),
        (f"mean DAAM max mIoU ≥ {GOAL_MEAN_MIOU:.0f}: {miou['All']:.1f} (thesis SD 2-base: {THESIS_SD2_MAX_MIOU['All']:.1f})",
         miou["All"] >= GOAL_MEAN_MIOU),
        *[(f"DAAM max mIoU ≥ {GOAL_CLASS_MIOU:.0f} for {name}: {miou[name]:.1f}", miou[name] >= GOAL_CLASS_MIOU) for name in classes],
        *[(f"best τ ≤ {GOAL_BEST_TAU} for {name}: {table.loc[name, 'best_tau']:.2f}", table.loc[name, "best_tau"] <= GOAL_BEST_TAU)
          for name in classes],
        *[(f"open-vocabulary mass share ≥ {GOAL_OPENVOCAB_SHARE} for {word}: {row['mass share']:.2f} "
           f"(its label's area: {row['area share']:.2f})", row["mass share"] >= GOAL_OPENVOCAB_SHARE)
          for word, row in results["openvocab"].iterrows()],
    ]
    summary = results.get("summary")
    if summary is not None:
        for variant in ("DAAM", "Linear DAAM"):
            before, after = summary[f"{variant} (not optimized)"]["All"], summary[f"{variant} (optimized)"]["All"]
            checks.append((f"{variant}: tokens optimized on 2 images beat the unoptimized maps on the test images: "
                           f"{after:.1f} vs {before:.1f}", after > before))
        linear, plain = summary["Linear DAAM (not optimized)"]["All"], summary["DAAM (not optimized)"]["All"]
        thesis = MAX_MIOU.loc["All"]
        checks.append((f"Linear DAAM in the thesis' order, below DAAM without optimization: {linear:.1f} vs {plain:.1f} "
                       f"(thesis {thesis[('Linear DAAM', 'not optimized')]:.1f} vs {thesis[('DAAM', 'not optimized')]:.1f})",
                       linear < plain))
    minutes = results.get("toy_full_minutes")
    if minutes is not None:
        checks.append((f"toy-full ≤ {MAX_TOY_FULL_MINUTES:.0f} min on this machine: {minutes:.1f} min", minutes <= MAX_TOY_FULL_MINUTES))
    return ["### Targets", "", *[f"- {'met' if ok else '**missed**'}: {text}" for text, ok in checks]]


def model_fingerprint(model_dir: Path) -> str:
    """A short hash of the model's weights: generated images cached for one model are never reused for another."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.rglob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--dataset-dir", type=Path, default=None,
                        help="where the generated images are kept (default: data/cache/toyworld-report/<model hash>)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="a finished toy-full run of this model: its dataset is measured and its summary read")
    parser.add_argument("--output", type=Path, default=data_dir().parent / "docs" / "toyworld.md")
    args = parser.parse_args(argv)
    if args.run_dir is not None and args.dataset_dir is not None:
        parser.error("--run-dir measures the run's own dataset; pass --run-dir or --dataset-dir, not both")
    summary = None if args.run_dir is None else run_summary(args.run_dir)  # checked before any generation
    figure_path = args.output.parent / "figures" / "toyworld_examples.png"
    dataset_dir = (args.run_dir / "dataset" if args.run_dir is not None
                   else args.dataset_dir or data_dir() / "cache" / "toyworld-report" / model_fingerprint(toy_model_dir()))
    minutes = None if args.run_dir is None else run_minutes(args.run_dir)
    results = {**measure(args.seeds, dataset_dir, figure_path), "summary": summary, "toy_full_minutes": minutes}
    write_report(results, args.output, figure_path)
    print(results["fidelity"].to_string(), results["daam"].to_string(), format_cosines(results["cosines"]), sep="\n\n")


if __name__ == "__main__":
    main()
