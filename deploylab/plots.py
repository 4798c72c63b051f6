"""The course's plots (matplotlib): sample images and accuracy against latency."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from .data import CLASS_NAMES


def image_grid(images: np.ndarray, labels: np.ndarray, per_class: int = 8) -> Figure:
    """A grid of real images: one row per class, the first ``per_class`` images of each."""
    fig, axes = plt.subplots(len(CLASS_NAMES), per_class, figsize=(per_class * 0.9, len(CLASS_NAMES) * 0.95))
    for label, name in enumerate(CLASS_NAMES):
        idx = np.flatnonzero(labels == label)[:per_class]
        for k, ax in enumerate(axes[label]):
            ax.axis("off")
            if k < len(idx):
                ax.imshow(images[idx[k]], cmap="gray", vmin=0, vmax=255)
        axes[label][0].set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def accuracy_vs_latency(records: list[dict[str, Any]], batch_size: int = 1, title: str | None = None) -> Figure:
    """Scatter of accuracy (%) against p50 latency (ms, log scale) at ``batch_size``, one point per record."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    b = str(batch_size)
    for r in records:
        lat = r["latency_ms"].get(b, {}).get("p50_ms")
        if lat is None or r.get("accuracy") is None:
            continue
        acc = 100 * r["accuracy"]
        ax.scatter(lat, acc, s=40)
        ax.annotate(f"{r['variant']} ({r['runtime']})", (lat, acc), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"p50 latency at batch {batch_size} (ms, log scale)")
    ax.set_ylabel("test accuracy (%)")
    profile = records[0]["profile"] if records else "?"
    cpu = records[0]["hardware"]["cpu"] if records else "?"
    ax.set_title(title or f"accuracy vs latency -- profile {profile}, {cpu}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig
