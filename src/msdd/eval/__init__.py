"""Metrics, reconstruction, grids, FLOP counting."""
