"""Adapters between shoal's flat vectors and ML frameworks (PyTorch today)."""
