"""dinoserve gateway: HTTP in front of Triton. Never imports torch, nor the trainer."""

from core import __version__

__all__ = ["__version__"]
