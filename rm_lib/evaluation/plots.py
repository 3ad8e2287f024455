"""PNG pictures for people: length histograms, reward distributions, reward against length,
accuracy per length bucket, the loss curve. Matplotlib with the Agg backend, so no display is needed.

Each picture is built by a `*_figure` function (tests read its axes and legends) and written by the
function of the same name without the suffix. Axes fit the data, legends sit outside the plotted
area, and no value is clipped at the border.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rm_lib.files import atomic_file

BLUE, ORANGE, GREEN, RED, PURPLE = "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b2"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> None:
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100, bbox_inches="tight",
                    metadata={"Software": None})  # no version stamp: the same data gives the same bytes
    _pyplot().close(fig)


def _legend_below(ax: Any, handles: list | None = None, ncol: int = 3) -> None:
    kwargs = {"handles": handles} if handles else {}
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=ncol, frameon=False, **kwargs)


def length_histograms_figure(lengths: dict[str, Sequence[int]], limits: dict[str, int | None],
                             title: str = "Token lengths") -> Any:
    """One panel per series (prompt, chosen, rejected). The x axis spans the data; a limit inside it
    is a red line, a limit beyond it is named in the panel's legend."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 3.6), squeeze=False, layout="constrained")
    for ax, (name, values) in zip(axes[0], lengths.items()):
        values = list(values) or [0]
        top = max(values)
        ax.hist(values, bins=min(40, max(1, top - min(values) + 1)), color=BLUE, label=f"{name} (n={len(values)})")
        limit = limits.get(name)
        if limit and limit <= top * 1.1:
            ax.axvline(limit, color=RED, linestyle="--", label=f"limit {limit}")
        elif limit:
            ax.plot([], [], color=RED, linestyle="--", label=f"limit {limit} (beyond the longest, {top})")
        ax.set_xlim(0, max(top, limit if limit and limit <= top * 1.1 else 0) * 1.05 + 1)
        ax.set_title(name)
        ax.set_xlabel("tokens")
        _legend_below(ax, ncol=1)
    axes[0][0].set_ylabel("pairs")
    fig.suptitle(title)
    return fig


def length_histograms(lengths: dict[str, Sequence[int]], limits: dict[str, int | None], path: str | Path,
                      title: str = "Token lengths") -> None:
    _save(length_histograms_figure(lengths, limits, title), path)


def reward_distributions_figure(chosen: Sequence[float], rejected: Sequence[float]) -> Any:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8), layout="constrained")
    ax.hist(list(chosen), bins=40, alpha=0.6, label="chosen", color=GREEN)
    ax.hist(list(rejected), bins=40, alpha=0.6, label="rejected", color=RED)
    ax.set_xlabel("reward")
    ax.set_ylabel("pairs")
    ax.set_title("Reward distributions")
    _legend_below(ax, ncol=2)
    return fig


def reward_distributions(chosen: Sequence[float], rejected: Sequence[float], path: str | Path) -> None:
    _save(reward_distributions_figure(chosen, rejected), path)


def reward_vs_length_figure(len_chosen: Sequence[int], r_chosen: Sequence[float], len_rejected: Sequence[int],
                            r_rejected: Sequence[float], correlation: float | None) -> Any:
    """Every scored answer as a point (token length, reward), chosen and rejected in two colours; the
    title gives Pearson's r over all of them, the number the release gate can bound."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    ax.scatter(list(len_chosen), list(r_chosen), s=8, alpha=0.5, color=GREEN, label="chosen")
    ax.scatter(list(len_rejected), list(r_rejected), s=8, alpha=0.5, color=RED, label="rejected")
    ax.set_xlabel("answer length (tokens, with the prompt)")
    ax.set_ylabel("reward")
    r = "undefined" if correlation is None else f"{correlation:+.3f}"
    ax.set_title(f"Reward against length (Pearson r {r})")
    _legend_below(ax, ncol=2)
    return fig


def reward_vs_length(len_chosen: Sequence[int], r_chosen: Sequence[float], len_rejected: Sequence[int],
                     r_rejected: Sequence[float], correlation: float | None, path: str | Path) -> None:
    _save(reward_vs_length_figure(len_chosen, r_chosen, len_rejected, r_rejected, correlation), path)


def bucket_accuracy_figure(labels: Sequence[str], accuracy: Sequence[float], longer_wins: Sequence[float],
                           shorter_wins: Sequence[float]) -> Any:
    """The model's accuracy per length bucket beside both length baselines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8), layout="constrained")
    xs = list(range(len(labels)))
    for offset, values, label, color in ((-0.27, accuracy, "reward model", BLUE),
                                         (0.0, longer_wins, "longer wins", ORANGE),
                                         (0.27, shorter_wins, "shorter wins", PURPLE)):
        ax.bar([x + offset for x in xs], values, width=0.27, label=label, color=color)
    ax.set_xticks(xs, labels, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.axhline(0.5, color="grey", linewidth=0.8)
    ax.set_xlabel("pair length (tokens)")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy per length bucket")
    _legend_below(ax)
    return fig


def bucket_accuracy(labels: Sequence[str], accuracy: Sequence[float], longer_wins: Sequence[float],
                    shorter_wins: Sequence[float], path: str | Path) -> None:
    _save(bucket_accuracy_figure(labels, accuracy, longer_wins, shorter_wins), path)


def loss_curve_figure(steps: Sequence[int], loss: Sequence[float], accuracy: Sequence[float]) -> Any:
    """Loss (left axis) and batch accuracy (right axis, 0 to a little above 1) with one legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8), layout="constrained")
    (loss_line,) = ax.plot(steps, loss, label="loss", color=BLUE, marker="o" if len(steps) < 20 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    twin = ax.twinx()
    (acc_line,) = twin.plot(steps, accuracy, label="batch accuracy", color=GREEN, alpha=0.7,
                            marker="o" if len(steps) < 20 else None)
    twin.set_ylabel("batch accuracy")
    twin.set_ylim(0, 1.05)
    ax.set_title("Training")
    _legend_below(ax, handles=[loss_line, acc_line], ncol=2)
    return fig


def loss_curve(steps: Sequence[int], loss: Sequence[float], accuracy: Sequence[float], path: str | Path) -> None:
    _save(loss_curve_figure(steps, loss, accuracy), path)
