"""Llama 3.1 405B-sized layers, for real (run by hand; never part of the tests).

    python bench/bench_405b.py [--layers 2] [--ranks 2,4] [--steps 8] [--out DIR]

Writes (once) a GGUF with Llama 3.1 405B's exact tensor shapes — dim 16384, FFN 53248,
128 query / 8 KV heads, vocab 128256, untied output, llama3 rope scaling (factor 8,
rope_freqs.weight) — but `--layers` layers, every matrix random Q4_0 blocks (random nibbles,
scales for values of std ~0.02: written directly, no f32 ever made; ~6 GB for 2 layers).
Then runs it over each rank count (bench_plan.py's worker: memory per rank after start-up,
greedy decode, a prompt forward) with the Q80 wire and with the F32 wire, and compares:
memory per rank against `plan --model` (within 10%?), the logits finite, greedy tokens
identical across rank counts, decode tok/s against the roofline (read bandwidth / the
largest rank's weight bytes) and against plan's prediction. The embedding (128256 x 16384)
is never expanded: the root reads the rows of the tokens it embeds from the mapped file.
Ranks beyond 2 oversubscribe this 2-core machine: their speed is not a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

SHAPE = dict(dim=16384, hidden_dim=53248, n_heads=128, n_kv_heads=8, vocab_size=128256)
ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
THETA = 500000.0
CONTEXT = 131072
STD = 0.02
ROWS_PER_CHUNK = 2048


def random_q4_0(rows: int, cols: int, rng: np.random.Generator, fout) -> int:
    """Write rows x cols of random Q4_0 blocks (f16 scale, 16 bytes of nibbles)."""
    nb = cols // 32
    scale = np.float16(STD / 4.6)       # uniform nibbles - 8: std ~4.6
    written = 0
    for r0 in range(0, rows, ROWS_PER_CHUNK):
        n = min(ROWS_PER_CHUNK, rows - r0)
        blocks = np.empty((n, nb, 18), np.uint8)
        blocks[:, :, :2] = np.frombuffer(scale.tobytes(), np.uint8)
        blocks[:, :, 2:] = rng.integers(0, 256, (n, nb, 16), dtype=np.uint8)
        blocks.tofile(fout)
        written += blocks.nbytes
    return written


def write_model(path: str, n_layers: int, seed: int = 0) -> str:
    import gguf
    from gguf import GGMLQuantizationType as QT

    from dllama_mpi.formats.base import llama3_rope_factors
    from dllama_mpi.testing.gguf_writer import FILE_TYPES
    from dllama_mpi.testing.llama_tensors import llama_tensor_specs
    if os.path.exists(path):
        return path
    c = SHAPE
    hd = c["dim"] // c["n_heads"]
    specs = llama_tensor_specs(**c, n_layers=n_layers, tied=False)
    w = gguf.GGUFWriter(None, "llama")
    w.add_type("model")
    w.add_name(f"Llama 3.1 405B shapes, {n_layers} layers, random Q4_0 (dllama_mpi bench)")
    w.add_block_count(n_layers)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(c["dim"])
    w.add_feed_forward_length(c["hidden_dim"])
    w.add_head_count(c["n_heads"])
    w.add_head_count_kv(c["n_kv_heads"])
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(FILE_TYPES["q4_0"])
    w.add_vocab_size(c["vocab_size"])
    w.add_rope_dimension_count(hd)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    rope = llama3_rope_factors(ROPE, head_dim=hd, rope_theta=THETA).astype(np.float32)
    plan = [("rope_freqs.weight", rope.shape, QT.F32)]
    for s in specs:
        plan.append((s.gguf_name, s.shape, QT.Q4_0 if s.is_matrix else QT.F32))
    for name, shape, t in plan:
        nbytes = int(np.prod(shape)) * 4 if t == QT.F32 else int(np.prod(shape)) // 32 * 18
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=t)
    tmp = f"{path}.tmp-{os.getpid()}"
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        w.write_padding(fout, fout.tell())
        for name, shape, t in plan:
            if name == "rope_freqs.weight":
                rope.tofile(fout)
                n = rope.nbytes
            elif t == QT.F32:                        # norms
                a = np.ones(shape, np.float32)
                a.tofile(fout)
                n = a.nbytes
            else:
                n = random_q4_0(shape[0], shape[1], rng, fout)
            w.write_padding(fout, n, w.data_alignment)
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    print(f"written {path}: {os.path.getsize(path) / 1e9:.2f} GB in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return path


def main() -> None:
    from bench_plan import MiB, bandwidth, err, predicted, run_worker
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--wires", default="q80,f32")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prefill", type=int, default=16)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = write_model(os.path.join(args.out, f"llama405b-shapes-{args.layers}layers-q4_0.gguf"),
                       args.layers)
    bw1, bw2 = bandwidth()
    results = []
    for wire in args.wires.split(","):
        for ranks in [int(x) for x in args.ranks.split(",")]:
            t0 = time.perf_counter()
            r = run_worker(path, ranks, ["--steps", str(args.steps), "--prompt-tokens", "4",
                                         "--prefill", str(args.prefill), "--buffer-float-type",
                                         wire], timeout=7200)
            r["wall_s"] = time.perf_counter() - t0
            p = predicted(r, bw2 if ranks > 1 else bw1, cores=min(ranks, 2))
            results.append((wire, r, p))
            print(f"{wire} x {ranks} ranks: {r['wall_s']:.0f} s, tokens {r['generated_tokens']}",
                  flush=True)
    lines = ["| wire | ranks | weights/rank (plan) | memory/rank plan | measured (max) | error | "
             "peak during load | finite | greedy tokens | decode tok/s | plan | roofline |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for wire, r, p in results:
        held = max(m["after"]["held"] for m in r["memory_measured"])
        peak = max(m["after"]["VmHWM"] for m in r["memory_measured"])
        pmem = max(p["rank_bytes"])
        roof = (bw2 / r["ranks"] if r["ranks"] > 1 else bw1) / max(p["weights"])
        over = r["ranks"] > 2          # more ranks than cores: no speed is a measurement
        note = " (oversubscribed)" if over else ""
        plan_speed = "—" if over else f"{p['decode_tok_s']:.2f}"
        roof_s = "—" if over else f"{roof:.2f}"
        lines.append(
            f"| {wire} | {r['ranks']} | {max(p['weights']) / MiB:.0f} MiB | {pmem / MiB:.0f} MiB | "
            f"{held / MiB:.0f} MiB | {err(pmem, held)} | {peak / MiB:.0f} MiB | "
            f"{r['finite']} | {r['generated_tokens'][:3]}… | {r['decode_tok_s']:.2f}{note} | "
            f"{plan_speed} | {roof_s} |")
    same = {wire: len({(tuple(r["generated_tokens"]), tuple(r["top10"]))
                       for w, r, _ in results if w == wire}) == 1
            for wire in args.wires.split(",")}
    print(f"\nread bandwidth (probe): {bw1 / 1e9:.1f} GB/s on 1 core, {bw2 / 1e9:.1f} on 2\n")
    print("\n".join(lines))
    print(f"\nidentical greedy tokens and top-10 of the first prediction across rank counts: "
          f"{same}")
    out = os.path.join(args.out, time.strftime("405b-%Y%m%d-%H%M%S.json"))
    with open(out, "w") as f:
        json.dump({"bandwidth": [bw1, bw2], "rows": results, "table": lines, "same": same}, f,
                  indent=1)
    print(f"written {out}")


if __name__ == "__main__":
    main()
