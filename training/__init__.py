"""dinoserve training: ViT backbones, DINO objective, trainer, checkpoints and export (torch side)."""
