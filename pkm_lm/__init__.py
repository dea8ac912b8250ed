"""pkm-lm: language models with Product Key Memory layers."""

__version__ = "0.1.0"
