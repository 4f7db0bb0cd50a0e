"""Next-token choice from logits: greedy, temperature, top-k, top-p; seeded. Log-probabilities
of the raw logits (log-softmax, as OpenAI reports them) when a request asks."""
from __future__ import annotations

import numpy as np


class Sampler:
    def __init__(self, temperature: float = 0.0, topp: float = 1.0, topk: int = 0,
                 seed: int | None = None):
        self.temperature = temperature
        self.topp = topp
        self.topk = topk
        self.rng = np.random.default_rng(seed)

    @classmethod
    def from_params(cls, params) -> "Sampler":
        """The sampler of one request's SamplingParams (its own seeded generator)."""
        return cls(params.temperature, params.top_p, params.top_k, params.seed)

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


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p of every token from raw logits (no temperature, no top-k/top-p), float64."""
    z = np.asarray(logits, np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def logprobs_of(logits: np.ndarray, token: int, top: int = 0
                ) -> tuple[float, list[tuple[int, float]] | None]:
    """The chosen token's log-probability, and the `top` most likely (token, logprob) pairs,
    most likely first (ties by token id), or None when top == 0."""
    lp = log_softmax(logits)
    if top <= 0:
        return float(lp[token]), None
    top = min(top, lp.size)
    idx = np.argpartition(-lp, top - 1)[:top]
    idx = idx[np.lexsort((idx, -lp[idx]))]
    return float(lp[token]), [(int(i), float(lp[i])) for i in idx]
