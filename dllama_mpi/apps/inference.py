"""`inference`: one prompt, its continuation streamed, then a summary (or one JSON object)."""
from __future__ import annotations

import json
import sys

from ..comm import make_comm
from ..runtime.generation import generate
from ..runtime.startup import run_root, start
from ..sampler import Sampler


def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def decode_averages(steps) -> dict:
    """Per decode step (one token) averages of one rank's statistics."""
    decode = [s for s in steps if s.n_tokens == 1]
    return {"compute_ms": 1e3 * _mean(s.compute_seconds for s in decode),
            "sync_ms": 1e3 * _mean(s.sync_seconds for s in decode),
            "bytes_sent": _mean(s.bytes_sent for s in decode),
            "bytes_recv": _mean(s.bytes_recv for s in decode)}


def run_inference(args, run) -> int:
    session = start(make_comm(), args.model, run, kv_dir=args.kv_cache_dir,
                    tokenizer_path=args.tokenizer)

    def report(result, steps) -> None:
        per_rank = [decode_averages(s) for s in steps]
        if args.json:
            text = session.tokenizer.decode(result.generated_tokens)
            sys.stdout.write(json.dumps(_json_result(session, result, text, per_rank)) + "\n")
            sys.stdout.flush()
        else:
            _print_summary(result, per_rank)

    return run_root(session, lambda s: _generate(s, args), report)


def _generate(session, args):
    """Root: tokenize, stream the continuation to stdout, return the Generation."""
    tok, engine, run = session.tokenizer, session.engine, session.run
    out = sys.stdout
    text = args.prompt
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}])
    prompt = tok.encode(text)
    if not args.json:
        session.print_memory()
        out.write(args.prompt)
        out.flush()
    decoder = tok.decoder()
    sample = Sampler(run.temperature, run.topp, run.topk, run.seed)

    def on_token(token: int) -> None:
        if args.stats:
            s = engine.steps[-1]
            print(f"\n[token {len(engine.steps)}] compute {1e3 * s.compute_seconds:.2f} ms"
                  f"  sync {1e3 * s.sync_seconds:.2f} ms  sent {s.bytes_sent / 1e3:.1f} kB"
                  f"  recv {s.bytes_recv / 1e3:.1f} kB", file=sys.stderr)
        if not args.json:
            out.write(decoder.push(token))
            out.flush()

    stop_ids = set() if args.ignore_eos else set(tok.eos_ids)
    result = generate(engine, prompt, args.steps, sample, stop_ids, session.max_seq_len,
                      run.prefill_chunk, on_token)
    if not args.json:
        out.write(decoder.flush() + "\n")
    return result


def _json_result(session, g, text, per_rank) -> dict:
    return {
        "prompt_tokens": g.prompt_tokens, "generated_tokens": g.generated_tokens,
        "text": text, "finish_reason": g.finish_reason,
        "prompt_tokens_per_s": g.prompt_tokens_per_s,
        "decode_tokens_per_s": g.decode_tokens_per_s,
        "n_ranks": session.comm.size, "nthreads": session.nthreads,
        "weights_float_type": session.run.weights_float_type,
        "buffer_float_type": session.run.buffer_float_type,
        "per_rank": [dict(rank=r, **avg) for r, avg in enumerate(per_rank)],
    }


def _print_summary(g, per_rank) -> None:
    print(f"prompt: {len(g.prompt_tokens)} tokens, {g.prompt_tokens_per_s:.1f} tok/s", file=sys.stderr)
    print(f"decode: {len(g.generated_tokens)} tokens, {g.decode_tokens_per_s:.1f} tok/s "
          f"(finish: {g.finish_reason})", file=sys.stderr)
    for r, a in enumerate(per_rank):
        print(f"  rank {r} per token: compute {a['compute_ms']:.2f} ms, sync {a['sync_ms']:.2f} ms, "
              f"sent {a['bytes_sent'] / 1e3:.1f} kB, recv {a['bytes_recv'] / 1e3:.1f} kB",
              file=sys.stderr)
