"""retouch: training-free editing, inversion and attention control for diffusion models."""

__version__ = "0.1.0"
