"""Blockwise masks for iBOT's masked-image modelling.

Follows Zhou et al., *iBOT* (ICLR 2022) and ``ImageFolderMask`` in the official ``bytedance/ibot``
``loader.py``, itself BEiT's blockwise masking (Bao et al., 2022): per global crop, a masking ratio is
drawn (one of ``pred_ratio``, each ± its ``pred_ratio_var``; the official ViT-S/16 recipe mixes 0 and
0.3 ± 0.2, so half of the images are not masked at all), then rectangles of random area (at least
``(min(h, w) // 3)²`` patches) and aspect ratio (log-uniform in ``[aspect, 1 / aspect]``) are masked
until the patch count reaches the ratio.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np

BLOCK_ATTEMPTS = 10  # tries to place one more block before giving up on reaching the ratio


class BlockMaskGenerator:
    """Draws boolean ``(h, w)`` masks, True on the patches the student sees as the mask token."""

    def __init__(
        self,
        pred_ratio: Sequence[float] = (0.3,),
        pred_ratio_var: Sequence[float] = (0.0,),
        aspect: float = 0.3,
    ):
        pred_ratio, pred_ratio_var = tuple(pred_ratio), tuple(pred_ratio_var)
        if len(pred_ratio) != len(pred_ratio_var):
            raise ValueError(f"pred_ratio {pred_ratio} and pred_ratio_var {pred_ratio_var} differ in length")
        for ratio, var in zip(pred_ratio, pred_ratio_var):
            if not (0 <= var <= ratio and ratio + var < 1):
                raise ValueError(f"masking ratio {ratio} ± {var} must stay within [0, 1)")
        if not 0 < aspect <= 1:
            raise ValueError(f"aspect must be in (0, 1], got {aspect}")
        self.pred_ratio, self.pred_ratio_var = pred_ratio, pred_ratio_var
        self.log_aspect = (math.log(aspect), math.log(1 / aspect))

    def draw_ratio(self, rng: random.Random) -> float:
        """One of the configured ratios, uniform within its ± range (official ``get_pred_ratio``)."""
        ratios = [rng.uniform(r - v, r + v) if v > 0 else r for r, v in zip(self.pred_ratio, self.pred_ratio_var)]
        return rng.choice(ratios)

    def __call__(self, h: int, w: int, rng: random.Random) -> np.ndarray:
        mask = np.zeros((h, w), dtype=bool)
        target = self.draw_ratio(rng) * h * w
        masked = 0
        while masked < target:
            added = self._add_block(mask, target - masked, rng)
            if added == 0:
                break
            masked += added
        return mask

    def _add_block(self, mask: np.ndarray, budget: float, rng: random.Random) -> int:
        """Mask one rectangle that adds between 1 and ``budget`` new patches; return how many it added."""
        h, w = mask.shape
        low = (min(h, w) // 3) ** 2
        for _ in range(BLOCK_ATTEMPTS):
            area = rng.uniform(low, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            bh = int(round(math.sqrt(area * aspect)))
            bw = int(round(math.sqrt(area / aspect)))
            if bw < w and bh < h:
                top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
                block = mask[top:top + bh, left:left + bw]
                new = bh * bw - int(block.sum())
                if 0 < new <= budget:
                    block[:] = True
                    return new
        return 0
