"""Token Geometry Analyzer: train small LLaMA-style transformer variants and measure
how their token representations are shaped by norm placement, norm type and MLP
activation."""

from importlib.metadata import PackageNotFoundError, version

try:
    # One version, pyproject.toml's, read from the installed package's metadata.
    __version__ = version("tga")
except PackageNotFoundError:  # a source tree on PYTHONPATH that was never installed
    __version__ = "0+unknown"
