"""Data layer of the training app (filled in below)."""
