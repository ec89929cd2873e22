"""Tests for modelsoup.cook.plots: each function writes a real, readable, non-blank PNG."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from modelsoup import plots
from modelsoup.errors import ConfigError, WriteError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")


def assert_valid_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    # Not one flat colour: something was actually drawn.
    assert np.ptp(pixels[..., :3]) > 0.5
    # Only the PNG itself is left; no temporary files beside it.
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def grid_scores() -> dict[tuple[float, float], float]:
    rng = np.random.default_rng(0)
    return {(lr, wd): 0.78 + 0.02 * rng.random() for lr in (1e-5, 3e-5, 1e-4) for wd in (0, 0.1)}


def test_grid_heatmap(tmp_path: Path) -> None:
    out = plots.plot_grid_heatmap(
        grid_scores(),
        x_label="learning rate",
        y_label="weight decay",
        soups={"uniform soup": 0.79, "greedy soup": 0.81},
        path=tmp_path / "grid.png",
        title="grid",
    )
    assert out == tmp_path / "grid.png"
    assert_valid_png(out)


def test_grid_heatmap_legend_with_many_soups_stays_inside_the_figure(tmp_path, monkeypatch):
    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or save(fig, path))
    soups = {
        f"{name} x10 runs, mean over random orders": 0.78 + 0.003 * i
        for i, name in enumerate(
            [
                "uniform",
                "greedy (sorted)",
                "greedy (random)",
                "pruned",
                "pruned (random)",
                "ensemble",
                "learned",
                "layer-wise",
            ]
        )
    }
    out = plots.plot_grid_heatmap(
        grid_scores(), x_label="lr", y_label="wd", soups=soups, path=tmp_path / "g.png"
    )
    assert_valid_png(out)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = figures[0]
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    box = fig.legends[0].get_window_extent(renderer)
    assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1


def test_grid_heatmap_with_nan_and_missing_cells(tmp_path: Path) -> None:
    scores = grid_scores()
    scores[(1e-4, 0.1)] = NAN
    del scores[(1e-5, 0)]
    out = plots.plot_grid_heatmap(
        scores, x_label="lr", y_label="wd", soups=None, path=tmp_path / "g.png"
    )
    assert_valid_png(out)


def test_grid_heatmap_all_nan_and_single_cell(tmp_path: Path) -> None:
    plots.plot_grid_heatmap(
        {(1, 1): NAN, (2, 1): NAN}, x_label="x", y_label="y", soups=None, path=tmp_path / "a.png"
    )
    plots.plot_grid_heatmap(
        {(1, 1): 0.5}, x_label="x", y_label="y", soups={"s": 0.5}, path=tmp_path / "b.png"
    )
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "b.png").read_bytes()[:8] == PNG_MAGIC


def test_greedy_curve_single_and_multi_run(tmp_path: Path) -> None:
    curves = {
        "sorted": [[0.78, 0.80, 0.80, 0.81]],
        "random": [[0.70, 0.75, 0.79, 0.80], [0.76, 0.77, 0.80], [0.74, 0.79, 0.79, 0.81]],
    }
    out = plots.plot_greedy_curve(
        curves, path=tmp_path / "greedy.png", baselines={"best individual": 0.79}
    )
    assert_valid_png(out)


def test_pruned_passes(tmp_path: Path) -> None:
    out = plots.plot_pruned_passes(
        [0, 1, 2, 3], [0.79, 0.80, 0.81, 0.81], [12, 8, 6, 6], path=tmp_path / "p.png"
    )
    assert_valid_png(out)


def test_method_bars_with_and_without_intervals(tmp_path: Path) -> None:
    out = plots.plot_method_bars(
        ["best individual", "uniform", "greedy", "ensemble"],
        [0.795, 0.79, 0.806, 0.811],
        [0.787, 0.781, 0.798, NAN],
        [0.803, 0.799, 0.814, NAN],
        path=tmp_path / "m.png",
        ylabel="test accuracy",
    )
    assert_valid_png(out)
    bare = plots.plot_method_bars(
        ["a", "b"], [1.0, 2.0], None, None, path=tmp_path / "new" / "b.png", ylabel="score"
    )
    assert bare.read_bytes()[:8] == PNG_MAGIC


def test_labels_are_drawn_as_written_dollars_included(tmp_path: Path) -> None:
    # a file name or recipe label with "$" is text, not matplotlib math (an odd number of
    # them failed to draw, after the cook had saved its soups)
    out = plots.plot_method_bars(
        ["run$_$", "greedy $\\alpha_{best$", "lr$^2$"],
        [0.5, 0.6, 0.7],
        None,
        None,
        path=tmp_path / "m.png",
        ylabel="cost in $",
    )
    assert_valid_png(out)
    heat = plots.plot_similarity_heatmap(
        np.eye(2), ["a$", "b$$"], path=tmp_path / "heat" / "s.png", title="$ similarity"
    )
    assert_valid_png(heat)


def test_similarity_heatmap(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    m = 1 - 0.01 * rng.random((5, 5))
    m = (m + m.T) / 2
    np.fill_diagonal(m, 1.0)
    m[0, 4] = m[4, 0] = NAN
    out = plots.plot_similarity_heatmap(m, list("abcde"), path=tmp_path / "s.png")
    assert_valid_png(out)


def test_interpolation(tmp_path: Path) -> None:
    alphas = np.linspace(0, 1, 11)
    curves = {
        "m1-m2": (list(alphas), list(0.78 + 0.03 * np.sin(np.pi * alphas))),
        "m1-m3": (list(alphas[::-1]), list(0.78 - 0.2 * np.sin(np.pi * alphas))),
    }
    out = plots.plot_interpolation(curves, path=tmp_path / "i.png", ylabel="accuracy")
    assert_valid_png(out)


def test_overwrite_replaces_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "p.png"
    target.write_bytes(b"old")
    plots.plot_pruned_passes([0, 1], [0.7, 0.8], [3, 2], path=target)
    assert_valid_png(target)


def test_failed_write_keeps_old_file_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.figure import Figure

    target = tmp_path / "p.png"
    target.write_bytes(b"old")

    def broken_savefig(self: Figure, *args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(WriteError, match="No space left"):
        plots.plot_pruned_passes([0, 1], [0.7, 0.8], [3, 2], path=target)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["p.png"]


@pytest.mark.parametrize(
    "call",
    [
        lambda p: plots.plot_pruned_passes([0, 1], [0.7], [3, 2], path=p),
        lambda p: plots.plot_pruned_passes([], [], [], path=p),
        lambda p: plots.plot_method_bars(["a"], [0.5], [0.4], None, path=p, ylabel="y"),
        lambda p: plots.plot_method_bars(["a"], [0.5], [0.6], [0.7], path=p, ylabel="y"),
        lambda p: plots.plot_similarity_heatmap(np.eye(3), ["a", "b"], path=p),
        lambda p: plots.plot_similarity_heatmap(np.ones((2, 3)), ["a", "b"], path=p),
        lambda p: plots.plot_greedy_curve({}, path=p),
        lambda p: plots.plot_greedy_curve({"sorted": [0.8, 0.9]}, path=p),
        lambda p: plots.plot_interpolation({"ab": ([0, 1], [0.5])}, path=p, ylabel="y"),
        lambda p: plots.plot_grid_heatmap({}, x_label="x", y_label="y", soups=None, path=p),
        lambda p: plots.plot_pruned_passes([0], [0.5], [1], path=p.with_suffix(".pdf")),
    ],
)
def test_bad_inputs_raise_config_error(tmp_path: Path, call: Callable[[Path], Path]) -> None:
    with pytest.raises(ConfigError):
        call(tmp_path / "bad.png")
    assert list(tmp_path.iterdir()) == []


def test_import_does_not_load_matplotlib() -> None:
    code = (
        "import sys, modelsoup.cook.plots, modelsoup.cook.stats; print('matplotlib' in sys.modules)"
    )
    src = Path(__file__).resolve().parents[1] / "src"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.strip() == "False"
