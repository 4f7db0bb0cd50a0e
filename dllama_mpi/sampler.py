"""Next-token choice from logits: greedy, temperature, top-k, top-p; seeded."""
from __future__ import annotations

import numpy as np


class Sampler:
    def __init__(self, temperature: float = 0.0, topp: float = 1.0, topk: int = 0,
                 seed: int | None = None):
        self.temperature = temperature
        self.topp = topp
        self.topk = topk
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0.0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        if self.topk and self.topk < z.size:
            idx = np.argpartition(-z, self.topk - 1)[: self.topk]
        else:
            idx = np.arange(z.size)
        z = z[idx]
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.topp < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, self.topp)) + 1]
            idx, p = idx[keep], p[keep] / p[keep].sum()
        return int(idx[self.rng.choice(p.size, p=p)])
