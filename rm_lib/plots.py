"""PNG pictures for people: length histograms, reward distributions, accuracy per length bucket,
the loss curve. Matplotlib with the Agg backend, so no display is needed."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .atomic import atomic_file


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100, bbox_inches="tight",
                    metadata={"Software": None})  # no version stamp: the same data gives the same bytes
    _figure().close(fig)


def length_histograms(lengths: dict[str, Sequence[int]], limits: dict[str, int | None], path: str | Path,
                      title: str = "Token lengths") -> None:
    """One panel per series (prompt, chosen, rejected) with its limit drawn as a red line."""
    plt = _figure()
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 3.4), squeeze=False)
    for ax, (name, values) in zip(axes[0], lengths.items()):
        ax.hist(list(values) or [0], bins=40, color="#4c72b0")
        limit = limits.get(name)
        if limit:
            ax.axvline(limit, color="#c44e52", linestyle="--", label=f"limit {limit}")
            ax.legend()
        ax.set_title(f"{name} (n={len(values)})")
        ax.set_xlabel("tokens")
    axes[0][0].set_ylabel("pairs")
    fig.suptitle(title)
    _save(fig, path)


def reward_distributions(chosen: Sequence[float], rejected: Sequence[float], path: str | Path) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(list(chosen), bins=40, alpha=0.6, label="chosen", color="#55a868")
    ax.hist(list(rejected), bins=40, alpha=0.6, label="rejected", color="#c44e52")
    ax.set_xlabel("reward")
    ax.set_ylabel("pairs")
    ax.legend()
    ax.set_title("Reward distributions")
    _save(fig, path)


def bucket_accuracy(labels: Sequence[str], accuracy: Sequence[float], baseline: Sequence[float],
                    path: str | Path) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], accuracy, width=0.4, label="reward model", color="#4c72b0")
    ax.bar([x + 0.2 for x in xs], baseline, width=0.4, label="longer wins", color="#dd8452")
    ax.set_xticks(list(xs), labels, rotation=20)
    ax.set_ylim(0, 1)
    ax.axhline(0.5, color="grey", linewidth=0.8)
    ax.set_xlabel("pair length (tokens)")
    ax.set_ylabel("accuracy")
    ax.legend()
    ax.set_title("Accuracy per length bucket")
    _save(fig, path)


def loss_curve(steps: Sequence[int], loss: Sequence[float], accuracy: Sequence[float], path: str | Path) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, loss, label="loss", color="#4c72b0")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    twin = ax.twinx()
    twin.plot(steps, accuracy, label="accuracy", color="#55a868", alpha=0.7)
    twin.set_ylabel("batch accuracy")
    twin.set_ylim(0, 1)
    ax.set_title("Training")
    _save(fig, path)
