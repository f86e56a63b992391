"""dogbreed: find dogs and people in photo archives and name each dog's breed."""

__version__ = "0.1.0"
