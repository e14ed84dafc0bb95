"""Token Geometry Analyzer: train small LLaMA-style transformer variants and measure
how their token representations are shaped by norm placement, norm type and MLP
activation."""

__version__ = "0.1.0"
