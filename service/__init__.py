"""dinoserve gateway: HTTP in front of Triton. Never imports torch."""

__version__ = "0.1.0"
