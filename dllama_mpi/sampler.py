"""Next-token choice from logits: greedy, temperature, top-k, top-p, min-p; seeded; over the
tokens a grammar allows when given a mask. Log-probabilities of the raw logits (log-softmax,
as OpenAI reports them) when a request asks.

Order (that of Hugging Face's warpers): mask (disallowed tokens are as if their logit were
-inf, greedy too) -> temperature -> top-k -> top-p -> min-p (drop tokens whose probability
is below min_p x the most likely token's) -> draw."""
from __future__ import annotations

import numpy as np

from .errors import DllamaError


class Sampler:
    def __init__(self, temperature: float = 0.0, topp: float = 1.0, topk: int = 0,
                 seed: int | None = None, min_p: float = 0.0):
        self.temperature = temperature
        self.topp = topp
        self.topk = topk
        self.min_p = min_p
        self.rng = np.random.default_rng(seed)

    @classmethod
    def from_params(cls, params) -> "Sampler":
        """The sampler of one request's SamplingParams (its own seeded generator)."""
        return cls(params.temperature, params.top_p, params.top_k, params.seed,
                   getattr(params, "min_p", 0.0))

    def __call__(self, logits: np.ndarray, allowed: np.ndarray | None = None) -> int:
        """A token id; `allowed`: a boolean mask over the logits (None: every token)."""
        if allowed is not None:
            allowed = allowed[:logits.size]
            if not allowed.any():
                raise DllamaError("the grammar allows no token here")
        if self.temperature == 0.0:
            if allowed is None:
                return int(np.argmax(logits))
            return int(np.argmax(np.where(allowed, logits, -np.inf)))
        if allowed is None:
            idx, z = np.arange(logits.size), logits
        else:
            idx = np.flatnonzero(allowed)
            z = logits[idx]
        z = z.astype(np.float64) / self.temperature
        if self.topk and self.topk < z.size:
            keep = np.argpartition(-z, self.topk - 1)[: self.topk]
            idx, z = idx[keep], z[keep]
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.topp < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, self.topp)) + 1]
            idx, p = idx[keep], p[keep] / p[keep].sum()
        if self.min_p > 0.0:
            keep = p >= self.min_p * p.max()
            idx, p = idx[keep], p[keep] / p[keep].sum()
        return int(idx[self.rng.choice(p.size, p=p)])


def masked(sample, logits: np.ndarray, allowed: np.ndarray | None) -> int:
    """Run a plain sampler callable(logits) -> id over the allowed tokens only (the others'
    logits set to -inf): for callers that bring their own sampler."""
    if allowed is None:
        return int(sample(logits))
    if isinstance(sample, Sampler):
        return sample(logits, allowed)
    z = np.where(allowed[:logits.size], logits, -np.inf).astype(logits.dtype, copy=False)
    return int(sample(z))


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
