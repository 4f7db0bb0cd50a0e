"""`inference`: one prompt, its continuation streamed, then a summary (or one JSON object).

stdout carries the generated text alone (the prompt too with --echo; one JSON object with
--json); everything else — start-up stages, sampling settings, --stats, the summary, errors —
goes to stderr, from rank 0.
"""
from __future__ import annotations

import json
import os
import secrets
import sys

from ..comm import make_comm
from ..runtime.generation import check_prompt, generate
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


def prompt_text(tok, args) -> str:
    """What goes through the model: the prompt, or with --chat the chat template around it."""
    if args.chat:
        return tok.apply_chat_template([{"role": "user", "content": args.prompt}])
    return args.prompt


def run_inference(args, run) -> int:
    prepared = {}
    if run.seed is None and run.temperature > 0:
        # a seed of our own, said on stderr: the text can be had again with --seed
        run.seed, prepared["random_seed"] = secrets.randbits(31), True

    def after_open(tok, max_seq_len: int) -> None:
        """Root, after opening the model, before loading it: the prompt must fit."""
        ids = tok.encode(prompt_text(tok, args))
        check_prompt(ids, max_seq_len)
        prepared["prompt"] = ids

    session = start(make_comm(), args.model, run, kv_dir=args.kv_cache_dir,
                    tokenizer_path=args.tokenizer, after_open=after_open,
                    progress=not args.quiet)

    def report(result, steps) -> None:
        per_rank = [decode_averages(s) for s in steps]
        if args.json:
            text = session.tokenizer.decode(result.generated_tokens, skip_special_tokens=True)
            sys.stdout.write(json.dumps(_json_result(session, result, text, per_rank)) + "\n")
            sys.stdout.flush()
        elif not args.quiet:
            _print_summary(result, per_rank)

    return run_root(session, lambda s: _generate(s, args, prepared), report)


def _generate(session, args, prepared: dict):
    """Root: stream the continuation to stdout, return the Generation."""
    tok, engine, run = session.tokenizer, session.engine, session.run
    out, err = sys.stdout, sys.stderr
    prompt = prepared["prompt"]
    if not args.quiet:
        session.print_memory()
        print(_sampling_line(run, args, len(prompt), prepared.get("random_seed", False)),
              file=err)
    err.flush()
    # the special tokens (an end of turn with --ignore-eos, a chat template's markers) are
    # not text: they are left out of what is printed
    decoder = tok.decoder(skip_special_tokens=True)
    sample = Sampler(run.temperature, run.topp, run.topk, run.seed)
    stats = _StatsLines(engine, err, shared=_same_terminal(out, err)) if args.stats else None
    if args.echo and not args.json:
        out.write(args.prompt + ("\n" if args.chat else ""))
        out.flush()
        if stats is not None:
            stats.wrote(args.prompt + ("\n" if args.chat else ""))

    def on_token(token: int) -> None:
        if stats is not None:
            stats.report()
        if not args.json:
            text = decoder.push(token)
            out.write(text)
            out.flush()
            if stats is not None:
                stats.wrote(text)

    stop_ids = set() if args.ignore_eos else set(tok.eos_ids)
    result = generate(engine, prompt, args.steps, sample, stop_ids, session.max_seq_len,
                      run.prefill_chunk, on_token)
    if stats is not None:
        stats.report()              # a prompt pass that gave no token (--steps 0)
    if not args.json:
        out.write(decoder.flush() + "\n")
        out.flush()
    return result


def _sampling_line(run, args, n_prompt: int, random_seed: bool) -> str:
    what = f"{n_prompt} prompt tokens{' (chat template)' if args.chat else ''}, "
    what += f"up to {args.steps} new" if args.steps else "no new tokens (--steps 0)"
    if run.temperature == 0:
        how = "greedy (--temperature 0)"
    else:
        how = f"temperature {run.temperature:g}, topp {run.topp:g}"
        if run.topk:
            how += f", topk {run.topk}"
        how += f", seed {run.seed}" + (f" (random: --seed {run.seed} repeats this text)"
                                       if random_seed else "")
    return f"generating: {what}; {how}"


def _same_terminal(out, err) -> bool:
    """stdout and stderr on one terminal: a stderr line must start on a line of its own."""
    try:
        return out.isatty() and err.isatty() and \
            os.fstat(out.fileno()).st_rdev == os.fstat(err.fileno()).st_rdev
    except (AttributeError, OSError, ValueError):
        return False


class _StatsLines:
    """--stats: one line per step on stderr. The steps before the first token are the prompt
    pass (in chunks of --prefill-chunk tokens); each later step is one token's decode (the
    first token comes from the prompt pass, so decode steps make tokens 2, 3, ...)."""

    def __init__(self, engine, err, shared: bool):
        self.engine, self.err, self.shared = engine, err, shared
        self.reported = 0
        self.tokens = 0
        self.mid_line = False       # the text printed so far does not end a line

    def wrote(self, text: str) -> None:
        if text:
            self.mid_line = not text.endswith("\n")

    def report(self) -> None:
        steps = self.engine.steps
        new = steps[self.reported:]
        if not new:
            return
        first = self.tokens == 0
        self.reported = len(steps)
        lines = []
        for i, s in enumerate(new):
            if first:
                label = "prompt pass" + (f" {i + 1}/{len(new)}" if len(new) > 1 else "")
                label += f": {s.n_tokens} tokens"
            else:
                label = f"token {self.tokens + 1}"
            lines.append(f"[{label}] compute {1e3 * s.compute_seconds:.2f} ms, sync "
                         f"{1e3 * s.sync_seconds:.2f} ms, sent {s.bytes_sent / 1e3:.1f} kB, "
                         f"recv {s.bytes_recv / 1e3:.1f} kB")
            if not first:
                self.tokens += 1
        if first:
            self.tokens = 1
        if self.shared and self.mid_line:     # same terminal as the text: a line of its own
            self.err.write("\n")
            self.mid_line = False
        self.err.write("\n".join(lines) + "\n")
        self.err.flush()


def _json_result(session, g, text, per_rank) -> dict:
    return {
        "prompt_tokens": g.prompt_tokens, "generated_tokens": g.generated_tokens,
        "text": text, "finish_reason": g.finish_reason,
        "prompt_tokens_per_s": g.prompt_tokens_per_s,
        "decode_tokens_per_s": g.decode_tokens_per_s,
        "seed": session.run.seed,
        "n_ranks": session.comm.size, "nthreads": session.nthreads,
        "weights_float_type": session.run.weights_float_type,
        "buffer_float_type": session.run.buffer_float_type,
        "per_rank": [dict(rank=r, **avg) for r, avg in enumerate(per_rank)],
    }


def _print_summary(g, per_rank) -> None:
    err = sys.stderr
    n = len(g.generated_tokens)
    if n == 0 and g.finish_reason == "length":     # --steps 0: the prompt was not run
        print(f"prompt: {len(g.prompt_tokens)} tokens, not run (--steps 0)", file=err)
        return
    print(f"prompt: {len(g.prompt_tokens)} tokens, {g.prompt_tokens_per_s:.1f} tok/s", file=err)
    if n == 0:
        print(f"decode: no tokens (finish: {g.finish_reason})", file=err)
        return
    # the first token comes from the prompt pass: decode speed is over the n - 1 others
    speed = f", {g.decode_tokens_per_s:.1f} tok/s" if n > 1 else ""
    print(f"decode: {n} token{'s' * (n > 1)}{speed} (finish: {g.finish_reason})", file=err)
    if n > 1:
        for r, a in enumerate(per_rank):
            print(f"  rank {r} per token: compute {a['compute_ms']:.2f} ms, sync "
                  f"{a['sync_ms']:.2f} ms, sent {a['bytes_sent'] / 1e3:.1f} kB, recv "
                  f"{a['bytes_recv'] / 1e3:.1f} kB", file=err)
