"""Mixture-of-experts routing: each row's top-k experts and their weights in one call (the
router's logits, softmax, the k largest, renormalised when the model says so). A decode step
routes every layer; done in numpy this is about ten small calls a layer. Exact IEEE
arithmetic: every rank computes the same choice from the same inputs."""
from __future__ import annotations

import numpy as np

from ._checks import _F32, _check
from ._jit import _exact


@_exact
def _route(xb, router, top, w, normalise):
    t, dim = xb.shape
    n, k = router.shape[0], top.shape[1]
    logits = np.empty(n, np.float32)
    for r in range(t):
        for e in range(n):
            acc = np.float32(0.0)
            for i in range(dim):
                acc += xb[r, i] * router[e, i]
            logits[e] = acc
        hi = logits.max()
        total = np.float32(0.0)
        for e in range(n):
            logits[e] = np.exp(logits[e] - hi)
            total += logits[e]
        chosen = np.float32(0.0)
        for j in range(k):       # the largest left, the lowest index among equals (stable)
            best = -1
            for e in range(n):
                if logits[e] >= 0 and (best < 0 or logits[e] > logits[best]):
                    best = e
            top[r, j] = best
            w[r, j] = logits[best] / total
            chosen += w[r, j]
            logits[best] = -1.0  # taken
        if normalise:
            for j in range(k):
                w[r, j] /= chosen


def route(xb: np.ndarray, router: np.ndarray, k: int, normalise: bool):
    """(top [T, k] int64 expert indices, weights [T, k] f32) for rows xb [T, dim] and the
    router [n_experts, dim]: softmax of xb @ router.T, the k largest in order, divided by
    their sum when normalise (Mixtral; Qwen3-MoE's norm_topk_prob)."""
    _check("xb", xb, _F32, ndim=2)
    _check("router", router, _F32, ndim=2)
    if xb.shape[1] != router.shape[1] or not 0 < k <= router.shape[0]:
        raise ValueError(f"route: xb {xb.shape}, router {router.shape}, k {k}")
    top = np.empty((xb.shape[0], k), np.int64)
    w = np.empty((xb.shape[0], k), np.float32)
    _route(xb, router, top, w, bool(normalise))
    return top, w
