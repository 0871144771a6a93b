"""plait: train large language models from one CPU to thousands of GPUs."""

__version__ = "0.1.0"
