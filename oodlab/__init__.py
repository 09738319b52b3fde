"""oodlab: hyperparameter studies for OOD detection with deep generative models."""

__version__ = "0.1.0"
