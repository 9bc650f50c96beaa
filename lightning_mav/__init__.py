"""lightning-mav: Make-A-Video as a PyTorch Lightning experiment suite."""

__version__ = "0.1.0"
