"""PNG figures of soup results, drawn from plain numbers.

Every function takes lists/dicts/arrays (never report objects), writes one PNG
atomically (a temporary file in the same folder, then ``os.replace``) and
returns its path. matplotlib is imported inside the functions, so importing
modelsoup stays fast; figures are drawn on a bare ``Figure`` with the Agg
renderer, which never opens a window and never touches pyplot's global state
(so a user's own backend, e.g. in a notebook, is left alone).

Example:
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "bars.png"
    >>> plot_method_bars(["best individual", "greedy soup"], [0.80, 0.81], None, None,
    ...                  path=out, ylabel="accuracy").name
    'bars.png'
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelsoup._util import atomic_file
from modelsoup.errors import ConfigError

__all__ = [
    "plot_greedy_curve",
    "plot_grid_heatmap",
    "plot_interpolation",
    "plot_method_bars",
    "plot_pruned_passes",
    "plot_similarity_heatmap",
]

# Marker colours for soups on a viridis colour bar: none of them is in viridis.
# Black is kept for the best individual model.
_SOUP_COLOURS = [
    "#d62728",
    "#ff7f0e",
    "#e377c2",
    "#17becf",
    "#8c564b",
    "#7f7f7f",
    "#bcbd22",
    "#9467bd",
]
_MAX_ANNOTATED_CELLS = 400


def _plain_text(draw: Callable[..., Path]) -> Callable[..., Path]:
    """Draw with every text as written: a label holding ``$`` (a file name, a recipe
    label) is not read as matplotlib's math, which fails on an odd number of them."""

    @functools.wraps(draw)
    def plain(*args: Any, **kwargs: Any) -> Path:
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return plain


@_plain_text
def plot_grid_heatmap(
    scores: Mapping[tuple[float, float], float],
    *,
    x_label: str,
    y_label: str,
    soups: Mapping[str, float] | None,
    path: str | os.PathLike[str],
    title: str | None = None,
) -> Path:
    """Heatmap of individual scores over a 2-D hyperparameter grid, soups marked.

    ``scores`` maps ``(x, y)`` (e.g. ``(learning_rate, weight_decay)``) to a
    score; grid cells without a score (or with NaN) stay blank. Each soup is a
    line on the colour bar, listed with its score under the plot next to the
    best cell of the grid (outlined; on test scores this is an oracle pick, not the
    held-out choice).

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "grid.png"
        >>> grid = {(1e-5, 0.0): 0.78, (1e-5, 0.1): 0.79, (3e-5, 0.0): 0.80}
        >>> plot_grid_heatmap(grid, x_label="learning rate", y_label="weight decay",
        ...                   soups={"greedy soup": 0.815}, path=out).exists()
        True
    """
    if not scores:
        raise ConfigError("scores is empty; need at least one (x, y) -> score entry")
    cells = {}
    for key, score in scores.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise ConfigError(f"grid keys must be (x, y) pairs, got {key!r}")
        x, y = (_number(v, f"grid key {key!r}") for v in key)
        cells[x, y] = _number(score, f"score at {key!r}")
    xs = sorted({x for x, _ in cells})
    ys = sorted({y for _, y in cells})
    column, row_of = {x: i for i, x in enumerate(xs)}, {y: i for i, y in enumerate(ys)}
    grid = np.full((len(ys), len(xs)), np.nan)
    for (x, y), score in cells.items():
        grid[row_of[y], column[x]] = score
    soups = dict(soups or {})
    for name, score in soups.items():
        if not math.isfinite(_number(score, f"soup {name!r}")):
            raise ConfigError(f"soup {name!r} has a non-finite score {score!r}")

    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    width = max(6.0, 0.9 * len(xs) + 3.5)
    # the legend below lists every soup: columns as wide as the longest label
    # fits, and extra height for its rows, so nothing is cut at the edges
    longest = max((len(f"{name}: 0.0000") for name in soups), default=20)
    ncols = max(1, min(3, int(width / (0.085 * longest + 0.7))))
    legend_rows = -(-(len(soups) + 1) // ncols)
    fig = _figure(width, max(4.5, 0.55 * len(ys) + 3.0) + 0.25 * legend_rows)
    ax = fig.add_subplot()
    # Soups are usually better than every ingredient: widen the colour range so
    # their marks land on the colour bar instead of off its end.
    image, norm = _heatmap(ax, grid, extra=list(soups.values()))
    _annotate_cells(ax, grid, image, norm, f"{{:.{_decimals(grid)}f}}")
    ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
    ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title or "individual models over the hyperparameter grid")

    colourbar = fig.colorbar(image, ax=ax)
    colourbar.set_label("score")
    handles = []
    if np.isfinite(grid).any():
        row, col = np.unravel_index(np.nanargmax(grid), grid.shape)
        ax.add_patch(
            Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.5)
        )
        best = grid[row, col]
        colourbar.ax.axhline(best, color="black", linestyle="--", linewidth=2)
        handles.append(
            Line2D([], [], color="black", linestyle="--", label=f"best cell: {best:.4g}")
        )
    for colour, (name, score) in zip(itertools.cycle(_SOUP_COLOURS), soups.items()):
        colourbar.ax.axhline(score, color=colour, linewidth=2.5)
        handles.append(Line2D([], [], color=colour, linewidth=2.5, label=f"{name}: {score:.4g}"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(ncols, len(handles)))
    return _save(fig, path)


@_plain_text
def plot_greedy_curve(
    curves: Mapping[str, Sequence[Sequence[float]]],
    *,
    path: str | os.PathLike[str],
    ylabel: str = "held-out accuracy",
    baselines: Mapping[str, float] | None = None,
) -> Path:
    """Soup score against the number of ingredients tried, one line per order.

    Each key (e.g. ``"sorted"``, ``"random"``) maps to one or more runs, each a
    list of scores after step 1..k. Keys with several runs show the mean with
    a shaded min-max band. ``baselines`` (e.g. the best individual) are drawn
    as dashed horizontal lines.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "greedy.png"
        >>> runs = {"sorted": [[0.80, 0.81, 0.81]], "random": [[0.7, 0.8, 0.8], [0.75, 0.79, 0.81]]}
        >>> plot_greedy_curve(runs, path=out).exists()
        True
    """
    if not curves:
        raise ConfigError("curves is empty; need at least one named list of runs")
    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot()
    for index, (name, runs) in enumerate(curves.items()):
        colour = f"C{index % 10}"
        table = _ragged_runs(runs, name)
        steps = np.arange(1, table.shape[1] + 1)
        # Runs may stop at different steps; each step averages the runs that reached it.
        mean = np.nanmean(table, axis=0)
        if table.shape[0] == 1:
            ax.plot(steps, mean, marker="o", markersize=3, color=colour, label=name)
            continue
        label = f"{name} (mean of {table.shape[0]} runs, band = min-max)"
        ax.plot(steps, mean, marker="o", markersize=3, color=colour, label=label)
        low, high = np.nanmin(table, axis=0), np.nanmax(table, axis=0)
        ax.fill_between(steps, low, high, color=colour, alpha=0.2, linewidth=0)
    _draw_baselines(ax, baselines)
    _integer_axis(ax.xaxis)
    return _save_line_plot(
        fig, ax, path, "ingredients tried", ylabel, "greedy soup: score as ingredients are tried"
    )


@_plain_text
def plot_pruned_passes(
    passes: Sequence[int],
    scores: Sequence[float],
    counts: Sequence[int],
    *,
    path: str | os.PathLike[str],
) -> Path:
    """Pruned soup score (left axis) and ingredients left (right axis) per pass.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "pruned.png"
        >>> plot_pruned_passes([0, 1, 2], [0.79, 0.81, 0.815], [12, 7, 6], path=out).exists()
        True
    """
    _same_length(passes=passes, scores=scores, counts=counts)
    x = _finite_array(passes, "passes")
    y = _finite_array(scores, "scores")
    left = _finite_array(counts, "counts")
    order = np.argsort(x, kind="stable")

    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot()
    twin = ax.twinx()
    # Counts are light bars behind; the score line goes on top, so lift its axes
    # above the twin and make its background transparent.
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)
    bars = twin.bar(
        x[order], left[order], width=0.5, color="C1", alpha=0.3, label="ingredients left"
    )
    twin.set_ylabel("ingredients left", color="C1")
    twin.tick_params(axis="y", labelcolor="C1")
    _integer_axis(twin.yaxis)
    (line,) = ax.plot(x[order], y[order], marker="o", color="C0", label="soup score")
    ax.set_xlabel("pruning passes")
    ax.set_ylabel("soup score", color="C0")
    ax.tick_params(axis="y", labelcolor="C0")
    _integer_axis(ax.xaxis)
    ax.set_title("pruned soup: score and size per pass")
    ax.grid(alpha=0.3)
    fig.legend(handles=[line, bars], loc="outside lower center", ncols=2)
    return _save(fig, path)


@_plain_text
def plot_method_bars(
    methods: Sequence[str],
    scores: Sequence[float],
    lows: Sequence[float] | None,
    highs: Sequence[float] | None,
    *,
    path: str | os.PathLike[str],
    ylabel: str,
    title: str | None = None,
) -> Path:
    """Methods side by side with confidence intervals (Table 1 as a figure).

    ``title`` replaces the default ("methods compared"), e.g. for the ingredients
    scored one by one; the PNG's ``Title`` and ``Description`` text entries carry the
    title and the row names, so tools can tell figures apart without looking.

    Drawn as points with error bars on a zoomed axis rather than bars from
    zero, so small but real gaps stay visible. A NaN low/high means "no
    interval" for that method.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "methods.png"
        >>> plot_method_bars(["uniform", "greedy"], [0.79, 0.81], [0.78, 0.80], [0.80, 0.82],
        ...                  path=out, ylabel="test accuracy").exists()
        True
    """
    if (lows is None) != (highs is None):
        raise ConfigError("give both lows and highs, or neither")
    lows = [math.nan] * len(scores) if lows is None else lows
    highs = [math.nan] * len(scores) if highs is None else highs
    _same_length(methods=methods, scores=scores, lows=lows, highs=highs)
    y = _finite_array(scores, "scores")
    low, high = np.asarray(lows, dtype=float), np.asarray(highs, dtype=float)
    has_ci = np.isfinite(low) & np.isfinite(high)
    if np.any(has_ci & ((low > y) | (high < y))):
        bad = int(np.flatnonzero(has_ci & ((low > y) | (high < y)))[0])
        raise ConfigError(
            f"{methods[bad]!r}: interval [{low[bad]}, {high[bad]}] excludes its score"
        )

    fig = _figure(7.5, max(2.5, 0.5 * len(methods) + 1.5))
    ax = fig.add_subplot()
    rows = np.arange(len(methods))[::-1]  # first method on top, like a table
    ax.errorbar(
        y[has_ci],
        rows[has_ci],
        xerr=[y[has_ci] - low[has_ci], high[has_ci] - y[has_ci]],
        fmt="o",
        color="C0",
        capsize=4,
    )
    ax.plot(y[~has_ci], rows[~has_ci], "o", color="C0")
    digits = _decimals(np.concatenate([y, low[has_ci], high[has_ci]]))
    for row, score, lo, hi, ci in zip(rows, y, low, high, has_ci):
        text = f"{score:.{digits}f}" + (f"  [{lo:.{digits}f}, {hi:.{digits}f}]" if ci else "")
        anchor = (hi if ci else score, row)
        ax.annotate(text, anchor, xytext=(8, 0), textcoords="offset points", va="center")
    ax.set_yticks(rows, list(methods))
    ax.set_xlabel(ylabel)  # horizontal layout: the score runs along x
    ax.set_ylim(-0.7, len(methods) - 0.3)
    ax.margins(x=0.25)  # room for the value labels on the right
    ax.grid(axis="x", alpha=0.3)
    heading = title or "methods compared"
    ax.set_title(heading + (" (error bars: confidence interval)" if has_ci.any() else ""))
    return _save(fig, path, {"Title": heading, "Description": "; ".join(map(str, methods))})


@_plain_text
def plot_similarity_heatmap(
    matrix: Any,
    labels: Sequence[str],
    *,
    path: str | os.PathLike[str],
    title: str = "cosine similarity of weights",
) -> Path:
    """Annotated heatmap of a square similarity matrix between models.

    The colour range follows the off-diagonal values: fine-tuned models from one
    start are often all above 0.99, which a fixed [-1, 1] scale would hide.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "sim.png"
        >>> plot_similarity_heatmap([[1.0, 0.98], [0.98, 1.0]], ["a", "b"], path=out).exists()
        True
    """
    values = np.asarray(matrix, dtype=float)
    if values.ndim != 2 or values.shape[0] != values.shape[1] or values.size == 0:
        raise ConfigError(f"similarity matrix must be square and non-empty, got {values.shape}")
    if len(labels) != values.shape[0]:
        raise ConfigError(f"{len(labels)} labels for a {values.shape[0]}x{values.shape[0]} matrix")
    n = values.shape[0]
    off_diagonal = values[~np.eye(n, dtype=bool)]
    scale_from = off_diagonal if np.isfinite(off_diagonal).any() else values

    side = max(5.0, 0.7 * n + 3.0)
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    image, norm = _heatmap(ax, values, scale_from=scale_from, origin="upper")
    _annotate_cells(ax, values, image, norm, f"{{:.{_decimals(scale_from, least=2)}f}}")
    ax.set_xticks(range(n), list(labels), rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), list(labels))
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8).set_label("similarity")
    return _save(fig, path)


@_plain_text
def plot_interpolation(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    path: str | os.PathLike[str],
    ylabel: str,
) -> Path:
    """Score along the straight line between two models, one curve per pair.

    Each value is ``(alphas, scores)``; alpha 0 is the first model of the pair,
    1 the second. NaN scores leave gaps.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "interp.png"
        >>> pair = ([0.0, 0.5, 1.0], [0.78, 0.81, 0.79])
        >>> plot_interpolation({"a-b": pair}, path=out, ylabel="accuracy").exists()
        True
    """
    if not curves:
        raise ConfigError("curves is empty; need at least one pair's (alphas, scores)")
    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot()
    for name, pair in curves.items():
        if len(pair) != 2:
            raise ConfigError(f"curve {name!r} must be an (alphas, scores) pair")
        alphas, scores = pair
        _same_length(**{f"{name!r} alphas": alphas, f"{name!r} scores": scores})
        a = _finite_array(alphas, f"{name!r} alphas")
        s = np.asarray(scores, dtype=float)
        order = np.argsort(a, kind="stable")
        ax.plot(a[order], s[order], marker="o", markersize=3, label=name)
    for end in (0.0, 1.0):
        ax.axvline(end, color="grey", linewidth=0.8, linestyle=":")
    return _save_line_plot(
        fig,
        ax,
        path,
        "interpolation weight α  (0 = first model, 1 = second model)",
        ylabel,
        "score along the line between two models",
    )


# --- shared drawing helpers -------------------------------------------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _heatmap(
    ax: Any,
    values: np.ndarray,
    *,
    extra: Sequence[float] = (),
    scale_from: np.ndarray | None = None,
    origin: str = "lower",
) -> tuple[Any, Any]:
    """Draw ``values`` with NaN cells blank; return the image and its colour norm."""
    import matplotlib
    from matplotlib.colors import Normalize

    source = values if scale_from is None else scale_from
    finite = np.concatenate([source[np.isfinite(source)], np.asarray(extra, dtype=float)])
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if low == high:  # a flat grid still needs a non-empty colour range
        low, high = low - 0.5, high + 0.5
    elif len(extra):  # keep marks at the extremes off the colour bar's edge
        pad = 0.03 * (high - low)
        low, high = low - pad, high + pad
    norm = Normalize(vmin=low, vmax=high)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, origin=origin)
    return image, norm


def _annotate_cells(ax: Any, values: np.ndarray, image: Any, norm: Any, fmt: str) -> None:
    """Write each finite value in its cell, white on dark colours and black on light."""
    if values.size > _MAX_ANNOTATED_CELLS:
        return
    fontsize = 9 if max(values.shape) <= 8 else 7
    for (row, col), value in np.ndenumerate(values):
        if not math.isfinite(value):
            continue
        red, green, blue, _ = image.cmap(norm(value))
        dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
        colour = "white" if dark else "black"
        ax.text(
            col, row, fmt.format(value), ha="center", va="center", fontsize=fontsize, color=colour
        )


def _draw_baselines(ax: Any, baselines: Mapping[str, float] | None) -> None:
    greys = itertools.cycle(["0.3", "0.55", "0.75"])
    for colour, (name, score) in zip(greys, (baselines or {}).items()):
        value = _number(score, f"baseline {name!r}")
        ax.axhline(value, color=colour, linestyle="--", linewidth=1.2, label=f"{name}: {value:.4g}")


def _decimals(values: np.ndarray, *, least: int = 1, most: int = 4) -> int:
    """Enough decimals to tell the closest of ``values`` apart, within [least, most]."""
    finite = values[np.isfinite(values)]
    spread = float(finite.max() - finite.min()) if finite.size else 0.0
    if spread == 0.0:
        return min(max(3, least), most)
    return min(most, max(least, 1 - math.floor(math.log10(spread))))


def _integer_axis(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _save_line_plot(
    fig: Any, ax: Any, path: str | os.PathLike[str], xlabel: str, ylabel: str, title: str
) -> Path:
    """Label, grid and legend a plot of lines, then save it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _save(
    fig: Any, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically; a reader never sees half a file.

    ``metadata`` becomes PNG text entries (``Title``, ``Description``, ...)."""
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ConfigError(f"{target}: plots are written as PNG; use a path ending in .png")
    with atomic_file(target) as tmp:
        fig.savefig(tmp, format="png", metadata=dict(metadata or {}))
    return target


# --- input checks ------------------------------------------------------------


def _number(value: Any, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {value!r}") from None


def _finite_array(values: Sequence[float], what: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a list of numbers") from None
    if array.ndim != 1 or not np.isfinite(array).all():
        raise ConfigError(f"{what} must be a flat list of finite numbers")
    return array


def _same_length(**named: Sequence[Any]) -> None:
    lengths = {name: len(values) for name, values in named.items()}
    if len(set(lengths.values())) != 1:
        detail = ", ".join(f"{name}={length}" for name, length in lengths.items())
        raise ConfigError(f"inputs must have the same length ({detail})")
    if not next(iter(lengths.values())):
        raise ConfigError(f"nothing to plot: {', '.join(lengths)} are empty")


def _ragged_runs(runs: Sequence[Sequence[float]], name: str) -> np.ndarray:
    """Stack runs of possibly different lengths into a NaN-padded table."""
    if not runs or not all(isinstance(run, (Sequence, np.ndarray)) for run in runs):
        raise ConfigError(f"curve {name!r} must be a non-empty list of runs, e.g. [[0.8, 0.81]]")
    if not all(len(run) for run in runs):
        raise ConfigError(f"curve {name!r} has an empty run")
    table = np.full((len(runs), max(len(run) for run in runs)), np.nan)
    for i, run in enumerate(runs):
        table[i, : len(run)] = _finite_array(run, f"curve {name!r} run {i}")
    return table
