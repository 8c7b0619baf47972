"""tunelab: fine-tune a small language model on your own machine and use the result."""

__version__ = "0.1.0"
