"""The report's pictures as PNG bytes (matplotlib, no display): a bar chart per metric, quality against
training steps and seconds, and image grids of rows x evaluation prompts."""

from __future__ import annotations

import io
import itertools

import numpy as np

BASE_COLOUR = "#9e9e9e"
# One colour per row in every chart: the base row and the methods' own rows have fixed ones (the same in every
# report, declared by each method), other rows take the remaining colours in row order.
SPARE_COLOURS = ("#d62728", "#8c564b", "#e377c2", "#bcbd22", "#7f7f7f", "#393b79")
THUMB = 96  # pixels: largest side of one image in a grid


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(width, height), dpi=90)


def _png(plt, fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def colour_table(names: list[str]) -> dict[str, str]:
    """Each row name's colour, for every chart of one report."""
    from ..methods import registry, rows_of

    fixed = {"base": BASE_COLOUR, **{row.name: row.colour for cls in registry().values() for row in rows_of(cls)
                                     if row.colour}}
    spare = itertools.cycle(SPARE_COLOURS)
    return {name: fixed.get(name) or next(spare) for name in names}


def bar_chart(title: str, bars: list[tuple[str, float | None, float | None, float | None]], colours: dict[str, str],
              ylabel: str = "", log: bool = False) -> bytes:
    """One bar per row: (name, value, low, high); low/high draw the interval; None values are left empty."""
    plt, fig = bar_figure(title, bars, colours, ylabel, log)
    return _png(plt, fig)


def bar_figure(title: str, bars: list[tuple[str, float | None, float | None, float | None]], colours: dict[str, str],
               ylabel: str = "", log: bool = False):
    """bar_chart's (pyplot, figure), before it becomes a PNG."""
    plt, fig = _figure(6.4, 3.4)
    ax = fig.add_subplot()
    names = [b[0] for b in bars]
    values = [np.nan if b[1] is None else b[1] for b in bars]
    low = [0 if b[2] is None or b[1] is None else max(b[1] - b[2], 0) for b in bars]
    high = [0 if b[3] is None or b[1] is None else max(b[3] - b[1], 0) for b in bars]
    ax.bar(range(len(bars)), values, color=[colours[name] for name in names], yerr=[low, high], capsize=4)
    ax.set_xticks(range(len(bars)), names, rotation=20, ha="right")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    else:  # the numbers as they are: no "1e8" offset above the axis
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    ax.grid(axis="y", alpha=0.3)
    return plt, fig


def grouped_bar_chart(title: str, groups: list[str], series: list[tuple[str, list[tuple | None]]],
                      colours: dict[str, str], marks: list[tuple[str, str, list[float | None]]]) -> bytes:
    """Bars grouped (one group per subject): per row (name, [(value, low, high) or None per group]), the interval
    as an error bar; marks as (label, line style, a value or None per group): a line across each group."""
    plt, fig = _figure(max(6.4, 0.35 * len(groups) * len(series) + 1.5), 3.6)
    ax = fig.add_subplot()
    width = 0.8 / max(len(series), 1)
    for k, (name, points) in enumerate(series):
        x = [g + (k - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = [p if p and p[0] is not None else (np.nan, None, None) for p in points]
        low = [0 if b[1] is None else max(b[0] - b[1], 0) for b in bars]
        high = [0 if b[2] is None else max(b[2] - b[0], 0) for b in bars]
        ax.bar(x, [b[0] for b in bars], width, color=colours[name], yerr=[low, high], capsize=2, label=name)
    for label, style, values in marks:
        drawn = [(g, mark) for g, mark in enumerate(values) if mark is not None]
        for n, (g, mark) in enumerate(drawn):
            ax.plot([g - 0.45, g + 0.45], [mark, mark], color="black", linestyle=style, label="_" if n else label)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(plt, fig)


def curve_chart(title: str, lines: list[tuple[str, list[tuple[float, float, float | None, float | None, float | None]]]],
                base: tuple[float | None, float | None, float | None] | None, colours: dict[str, str]) -> bytes:
    """Quality against training steps (left) and seconds (right): per row (name, [(step, seconds, value,
    low, high)]), interval as a band; the base model's value as a dashed line with its band."""
    plt, fig = _figure(9.6, 3.4)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, column, label in ((axes[0], 0, "training steps"), (axes[1], 1, "training seconds")):
        for name, points in lines:
            points = [p for p in points if p[2] is not None]
            if not points:
                continue
            x = [p[column] for p in points]
            colour = colours[name]
            ax.plot(x, [p[2] for p in points], marker="o", color=colour, label=name)
            ax.fill_between(x, [p[3] for p in points], [p[4] for p in points], color=colour, alpha=0.15)
        if base is not None and base[0] is not None:
            ax.axhline(base[0], color=BASE_COLOUR, linestyle="--", label="base")
            ax.axhspan(base[1], base[2], color=BASE_COLOUR, alpha=0.15)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(title)
    if axes[1].get_legend_handles_labels()[0]:  # a metric nobody measured (one image per prompt: no diversity)
        axes[1].legend(fontsize=8, loc="best")
    fig.suptitle(f"{title} along the run")
    return _png(plt, fig)


def mosaic(images: np.ndarray, columns: int = 2) -> np.ndarray:
    """Images [k,H,W,3] tiled `columns` wide with 1-px white gaps, resized so the largest side is THUMB."""
    from PIL import Image

    k, h, w, _ = images.shape
    scale = THUMB / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.NEAREST if scale >= 1 else Image.LANCZOS
    tiles = [np.asarray(Image.fromarray(im).resize(size, resample)) for im in images]
    rows = -(-k // columns)
    out = np.full((rows * (size[1] + 1) - 1, columns * (size[0] + 1) - 1, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[r * (size[1] + 1): r * (size[1] + 1) + size[1], c * (size[0] + 1): c * (size[0] + 1) + size[0]] = tile
    return out


def image_grid(title: str, row_names: list[str], prompts: list[str], cells: list[list[np.ndarray | None]]) -> bytes:
    """A grid with one row per method and one column per prompt; each cell a mosaic of that row's images
    for that prompt (None: nothing to show)."""
    import textwrap

    plt, fig = _figure(1.45 * len(prompts) + 1.2, 1.55 * len(row_names) + 0.9)
    axes = np.atleast_2d(fig.subplots(len(row_names), len(prompts), squeeze=False))
    for r, name in enumerate(row_names):
        for c, prompt in enumerate(prompts):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if cells[r][c] is not None:
                ax.imshow(cells[r][c], interpolation="nearest")
            if r == 0:
                ax.set_title(textwrap.fill(prompt, 22), fontsize=7)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(wspace=0.05, hspace=0.08)
    return _png(plt, fig)
