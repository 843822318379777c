"""harmprune: targeted weight pruning as a causal probe of harmful generation."""
__version__ = "0.1.0"
