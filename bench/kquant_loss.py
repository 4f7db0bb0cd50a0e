"""What reading K-quants into our runtime forms loses, measured per tensor (docs/models.md).

    python bench/kquant_loss.py [--model SmolLM2.gguf | --model gaussian]

Takes real weight matrices (those of --model, dequantised; default: SmolLM2-135M from the
cache when it is there, else Gaussian rows), quantises them to Q4_K, Q5_K and Q6_K with the
test quantisers (dllama_mpi.testing.kquants), converts them as loading does (Q4_K -> Q41,
the others -> Q80) and prints, per type: the share of 32-value blocks converted exactly, the
largest error in steps of the source type, and the RMS of the conversion error relative to
the RMS of the source type's own rounding error (so 1 % means the conversion adds 1 % to
the error the file already had; the added noise power is the square of that).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from dllama_mpi.quant import dequantize_q41, dequantize_q80  # noqa: E402
from dllama_mpi.quant.kquants import q4k_exact_fraction, q4k_factors, q4k_to_q41, to_q80  # noqa: E402
from dllama_mpi.testing.kquants import QUANTIZERS  # noqa: E402


def matrices(path: str | None, limit: int = 24):
    if path == "gaussian":
        path = ""
    elif path is None:
        try:
            from dllama_mpi.registry import cached_path
            path = cached_path("smollm2-135m")
        except Exception:  # noqa: BLE001 - no cache: Gaussian rows
            path = None
    if path is None or not os.path.isfile(path):
        rng = np.random.default_rng(0)
        yield "gaussian", (rng.standard_normal((512, 1536)) * 0.02).astype(np.float32)
        return
    from dllama_mpi.formats import open_model
    m = open_model(path)
    n = 0
    for name, t in m.tensors.items():
        if len(t.shape) != 2 or t.shape[1] % 256 or not name.startswith("blk."):
            continue
        yield name, dequantize(np.asarray(t.data), QT[t.type]).astype(np.float32)
        n += 1
        if n >= limit:
            return


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a model file, or 'gaussian' (N(0, 0.02) rows)")
    args = ap.parse_args()
    stats = {t: {"exact": [], "max_steps": 0.0, "conv": 0.0, "own": 0.0, "n": 0}
             for t in ("Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q8_0")}
    names = []
    for name, w in matrices(args.model):
        names.append(name)
        for t, st in stats.items():
            raw = QUANTIZERS[t](w) if t in QUANTIZERS else quantize(w, QT[t])
            ref = dequantize(raw, QT[t])
            if t == "Q4_K":
                got = dequantize_q41(q4k_to_q41(raw))
                st["exact"].append(q4k_exact_fraction(raw))
                step = np.repeat(np.abs(q4k_factors(raw)[0]), 32, axis=1)
            else:
                got = dequantize_q80(to_q80(raw, t))
                st["exact"].append(float((got == ref).reshape(-1, 32).all(-1).mean()))
                levels = {"Q5_K": 31, "Q6_K": 63, "Q5_0": 31, "Q8_0": 254}[t]
                blocks = ref.reshape(ref.shape[0], -1, 32)
                step = np.repeat((blocks.max(-1) - blocks.min(-1)) / levels, 32, axis=1)
            err = np.abs(got - ref)
            ok = step > 0
            st["max_steps"] = max(st["max_steps"], float((err[ok] / step[ok]).max()))
            st["conv"] += float((err.astype(np.float64) ** 2).sum())
            st["own"] += float(((ref - w).astype(np.float64) ** 2).sum())
            st["n"] += w.size
    print(f"{len(names)} matrices ({names[0]} ...)")
    print(f"{'type':6} {'runtime':7} {'exact blocks':>12} {'max err (steps)':>16} "
          f"{'conv RMS / own RMS':>19}")
    for t, st in stats.items():
        rt = "q41" if t == "Q4_K" else "q80"
        print(f"{t:6} {rt:7} {100 * np.mean(st['exact']):11.2f}% {st['max_steps']:16.4f} "
              f"{100 * np.sqrt(st['conv'] / st['own']):18.2f}%")


if __name__ == "__main__":
    main()
