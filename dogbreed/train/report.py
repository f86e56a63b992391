"""Results written beside a trained model: per-epoch curves, test top-1/top-5, per-breed accuracy, confusion.

The figures themselves come from evaluate.breed_metrics, the scan-path measurement.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

HISTORY_FIELDS = ["epoch", "stage", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: training runs on headless workers
    import matplotlib.pyplot as plt

    return plt


def write_history(history: list[dict[str, Any]], out_dir: str | Path) -> tuple[Path, Path]:
    """history.csv and curves.png (loss and accuracy per epoch, train vs val)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out_dir / "history.csv", out_dir / "curves.png"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    best = min(history, key=lambda h: h["val_loss"])["epoch"]
    for ax, metric in zip(axes, ("loss", "acc")):
        for split in ("train", "val"):
            ax.plot(epochs, [h[f"{split}_{metric}"] for h in history], marker="o", label=split)
        ax.axvline(best, color="grey", linestyle=":", label=f"kept (epoch {best})")
        for prev, h in zip(history, history[1:]):
            if h["stage"] != prev["stage"]:
                ax.axvline(h["epoch"] - 0.5, color="black", linewidth=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title({"loss": "cross-entropy loss", "acc": "top-1 accuracy"}[metric])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return csv_path, png_path


def write_test_report(result: dict[str, Any], class_names: list[str], out_dir: str | Path) -> None:
    """metrics.json, per_breed.csv, confusion.csv and confusion.png in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {k: result[k] for k in ("n", "top1", "top5")}
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    with open(out_dir / "per_breed.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["breed", "n", "accuracy"])
        writer.writeheader()
        writer.writerows(result["per_breed"])
    with open(out_dir / "confusion.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["truth \\ predicted", *class_names])
        writer.writerows([name, *row] for name, row in zip(class_names, result["confusion"]))
    _plot_confusion(np.asarray(result["confusion"]), class_names, out_dir / "confusion.png")


def _plot_confusion(confusion: np.ndarray, class_names: list[str], path: Path) -> None:
    from dogbreed.report import plain_text  # breed names are data: a '$' must not start mathtext

    plt = _pyplot()
    class_names = [plain_text(n) for n in class_names]
    n = len(class_names)
    side = min(4 + 0.35 * n, 40)
    fig, ax = plt.subplots(figsize=(side, side))
    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=7 if n > 30 else 9)
    ax.set_yticks(range(n), class_names, fontsize=7 if n > 30 else 9)
    if n <= 30:  # counts stay legible only for small taxonomies
        for i, j in zip(*np.nonzero(confusion)):
            ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
