"""Measuring on labelled photos: detector rates and breed accuracy, and face detectors side by side."""
