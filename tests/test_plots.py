"""The pictures read from their data, not by eye: axes fit the values, legends sit outside the plotted
area, both length baselines are drawn, accuracy 1.0 is not clipped at the border."""
from __future__ import annotations

import pytest

from rm_lib.evaluation import plots


def _outside(fig, ax) -> bool:
    """The axes' legend lies wholly outside the axes' plotted area (below it)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend()
    assert legend is not None, "no legend"
    box, area = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
    return box.y1 <= area.y0 or box.x0 >= area.x1


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plots._pyplot().close("all")


def test_length_histograms_fit_short_lengths_and_name_a_far_limit():
    lengths = {"prompt": [5, 8, 12], "chosen": [20, 30, 41], "rejected": [18, 25, 39]}
    fig = plots.length_histograms_figure(lengths, {"prompt": 384, "chosen": 40, "rejected": 512})
    prompt, chosen, rejected = fig.axes
    assert prompt.get_xlim()[1] < 20  # the 0-512 axis made 5-12 tokens invisible
    assert "beyond the longest" in " ".join(t.get_text() for t in prompt.get_legend().get_texts())
    assert chosen.get_xlim()[1] >= 41 and any(line.get_xdata()[0] == 40 for line in chosen.get_lines())
    assert all(_outside(fig, ax) for ax in fig.axes)
    # the figure title does not overlap the panel titles
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    top = fig._suptitle.get_window_extent(renderer)
    assert all(top.y0 >= ax.title.get_window_extent(renderer).y1 - 1 for ax in fig.axes)


def test_bucket_accuracy_draws_both_baselines_and_keeps_the_legend_off_the_bars():
    fig = plots.bucket_accuracy_figure(["1-10", "11-20"], [1.0, 0.6], [0.8, 0.3], [0.2, 0.7])
    (ax,) = fig.axes
    assert len(ax.containers) == 3
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["reward model", "longer wins", "shorter wins"]
    assert [bar.get_height() for bar in ax.containers[2]] == [0.2, 0.7]
    assert ax.get_ylim()[1] > 1.0 and _outside(fig, ax)


def test_loss_curve_has_one_legend_for_both_lines_and_does_not_clip_accuracy():
    fig = plots.loss_curve_figure([1, 2, 3], [0.7, 0.6, 0.5], [0.5, 1.0, 1.0])
    ax, twin = fig.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["loss", "batch accuracy"]
    assert twin.get_ylim()[1] > 1.0 and _outside(fig, ax)
    assert list(twin.get_lines()[0].get_ydata()) == [0.5, 1.0, 1.0]


def test_pictures_are_written_and_reproducible(tmp_path):
    for name in ("a.png", "b.png"):
        plots.reward_distributions([0.1, 0.5, 0.9], [0.0, 0.2, 0.4], tmp_path / name)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
