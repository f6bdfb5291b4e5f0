"""Pruning: magnitude, Wanda, SparseGPT, N:M (``slm prune``) and structured (heads, channels, layers)."""
