"""`inference`: one prompt, its continuation streamed, then a summary (or one JSON object)."""
from __future__ import annotations

import sys

from .comm import make_comm
from .errors import DllamaError
from .generation import generate
from .sampler import Sampler
from .session import start


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
    comm = make_comm()
    session = start(comm, args.model, run, kv_dir=args.kv_cache_dir, tokenizer_path=args.tokenizer)
    engine = session.engine
    if not comm.is_root:
        engine.serve()
        return 0

    tok = session.tokenizer
    out = sys.stdout
    error = None
    result = None
    try:
        text = args.prompt
        if args.chat:
            text = tok.apply_chat_template([{"role": "user", "content": text}])
        prompt = tok.encode(text)
        if not args.json:
            _print_memory(session)
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
        result = generate(engine, prompt, args.steps, sample, stop_ids,
                          session.max_seq_len, run.prefill_chunk, on_token)
        if not args.json:
            out.write(decoder.flush() + "\n")
    except DllamaError as e:
        error = e
    finally:
        engine.stop()
    per_rank = [decode_averages(steps) for steps in engine.gather_step_stats()]
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.json:
        from .cli import print_json
        print_json(_json_result(session, result, tok.decode(result.generated_tokens), per_rank))
    else:
        _print_summary(result, per_rank)
    return 0


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


def _print_memory(session) -> None:
    for r, (w, kv) in enumerate(session.memory):
        print(f"rank {r}: weights {w / 2**20:.1f} MiB, KV cache {kv / 2**20:.1f} MiB "
              f"({session.max_seq_len} positions), {session.nthreads} threads", file=sys.stderr)


def _print_summary(g, per_rank) -> None:
    print(f"prompt: {len(g.prompt_tokens)} tokens, {g.prompt_tokens_per_s:.1f} tok/s", file=sys.stderr)
    print(f"decode: {len(g.generated_tokens)} tokens, {g.decode_tokens_per_s:.1f} tok/s "
          f"(finish: {g.finish_reason})", file=sys.stderr)
    for r, a in enumerate(per_rank):
        print(f"  rank {r} per token: compute {a['compute_ms']:.2f} ms, sync {a['sync_ms']:.2f} ms, "
              f"sent {a['bytes_sent'] / 1e3:.1f} kB, recv {a['bytes_recv'] / 1e3:.1f} kB",
              file=sys.stderr)
