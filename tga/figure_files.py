"""Which files a figure is written to: the PNG, plus a copy in ``figures.format``.

Free of matplotlib and pandas, because the workflow imports it while it builds the DAG
(``snakemake -n`` stays fast and needs neither); :mod:`tga.figure_style` writes the files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

__all__ = ["FIGURE_FORMATS", "figure_copies", "figure_paths", "figure_suffixes"]

#: File formats a figure can be written in (config ``figures.format`` adds one to PNG).
FIGURE_FORMATS = ("png", "pdf", "svg")


def figure_paths(out_path: Path | str | Sequence[Path | str]) -> list[Path]:
    """The files one figure is written to: a path, or several (the PNG plus the
    ``figures.format`` copy); the format of each follows its suffix."""
    paths = [Path(out_path)] if isinstance(out_path, (str, Path)) else [Path(p) for p in out_path]
    if not paths:
        raise ValueError("no output path given for the figure")
    for path in paths:
        fmt = path.suffix.lstrip(".").lower()
        if fmt not in FIGURE_FORMATS:
            raise ValueError(f"{path}: figure format {fmt!r} is not one of {', '.join(FIGURE_FORMATS)} "
                             "(the file suffix decides the format)")
    return paths


def figure_suffixes(fmt: str) -> list[str]:
    """File suffixes every figure is written with for config ``figures.format``: the PNG
    always (the HTML report embeds it), plus a PDF or SVG copy for a paper."""
    if fmt not in FIGURE_FORMATS:
        raise ValueError(f"figures.format {fmt!r} is not one of {', '.join(FIGURE_FORMATS)}")
    return [".png"] + ([f".{fmt}"] if fmt != "png" else [])


def figure_copies(png: str, fmt: str) -> list[str]:
    """The copies of the figure ``png`` in ``fmt`` (config ``figures.format``) besides the
    PNG, none for png: the workflow makes them outputs of the figure's own rule, so every
    format of every figure is a target."""
    if not png.endswith(".png"):
        raise ValueError(f"{png}: a figure's first output is its PNG")
    return [png[: -len(".png")] + suffix for suffix in figure_suffixes(fmt)[1:]]
