"""safeunits: post-safety alignment of LLMs at the level of single units (MLP channels, attention heads)."""

__version__ = "0.1.0"
