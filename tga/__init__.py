"""Token Geometry Analyzer: train small LLaMA-style transformer variants and measure
how their token representations are shaped by norm placement, norm type and MLP
activation."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _version() -> str:
    """One version, pyproject.toml's, read from the installed package's metadata; a
    source tree on PYTHONPATH that was never installed says ``0+unknown``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tga")
    except PackageNotFoundError:
        return "0+unknown"


def __getattr__(name: str) -> str:
    """``tga.__version__`` (and ``from tga import __version__``), looked up on first
    use: every pipeline job imports this package, and reading the installed metadata
    (importlib.metadata and a scan of sys.path) is only worth it where the version is
    shown, as in ``tga --version``."""
    if name == "__version__":
        return _version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
