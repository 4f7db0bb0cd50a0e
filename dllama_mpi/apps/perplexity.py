"""`perplexity`: teacher-forced perplexity of a text, in strided windows.

    python -m dllama_mpi perplexity --model M --text FILE [--ctx 512] [--stride 256] [--json]

The text's tokens (with the model's BOS when it adds one) are cut into windows of `ctx`
tokens starting every `stride` tokens (the last window ends at the text's end); each
window is evaluated from an empty KV cache in forwards of `--batch` rows with every row's
logits gathered on the root, and scores only the tokens no earlier window scored (the
first window all but its first token): with stride < ctx every token after the first is
scored once, with at least ctx - stride tokens of context except in the first window
(Hugging Face's strided perplexity); with stride == ctx the windows do not overlap and each
one's first token, which has no context, is not scored. The negative log-likelihoods are summed in float64 from the float32 logits;
perplexity = exp(mean NLL), its standard error exp(mean) * std(NLL) / sqrt(n).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from ..comm import make_comm
from ..errors import DllamaError
from ..runtime.startup import run_root, start


@dataclass(frozen=True)
class Window:
    begin: int          # first token of the window
    end: int            # one past its last token
    scored: int         # first target scored (targets scored: scored..end-1)


def windows(n: int, ctx: int, stride: int) -> list[Window]:
    """The windows over n tokens (targets 1..n-1 scored once each; with stride == ctx,
    not the first token of a window)."""
    out, prev_end, begin = [], 0, 0
    while n >= 2:
        end = min(begin + ctx, n)
        out.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n:
            break
        begin += stride
    return out


@dataclass
class Result:
    nll: np.ndarray                 # float64 [tokens scored]
    top1: np.ndarray                # the model's likeliest token at each scored position
    tokens_evaluated: int           # rows through the model (windows overlap)
    windows: int
    seconds: float
    ctx: int
    stride: int
    n_tokens: int
    extra: dict = field(default_factory=dict)

    @property
    def mean_nll(self) -> float:
        return float(self.nll.mean())

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def stderr(self) -> float:
        n = self.nll.size
        if n < 2:
            return float("nan")
        return self.perplexity * float(self.nll.std(ddof=1)) / math.sqrt(n)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_evaluated / self.seconds if self.seconds else 0.0


def token_nll(logits: np.ndarray, targets) -> np.ndarray:
    """-log softmax(logits)[target] per row, in float64."""
    x = np.asarray(logits, np.float64)
    m = x.max(axis=1)
    lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
    return lse - x[np.arange(x.shape[0]), np.asarray(targets, np.int64)]


def evaluate(engine, ids: list[int], ctx: int, stride: int, batch: int) -> Result:
    """Root: every window's forwards on every rank, NLL of the scored tokens."""
    parts, top1 = [], []
    evaluated = 0
    ws = windows(len(ids), ctx, stride)
    t0 = time.perf_counter()
    for w in ws:
        for c0 in range(w.begin, w.end, batch):
            c1 = min(c0 + batch, w.end)
            # rows a (absolute) predict token a + 1; the scored targets need rows
            # w.scored - 1 .. w.end - 2
            lo, hi = max(c0, w.scored - 1), min(c1, w.end - 1)
            logits = engine.forward(ids[c0:c1], c0 - w.begin, all_logits=lo < hi)
            if lo < hi:
                rows = logits[lo - c0:hi - c0]
                parts.append(token_nll(rows, ids[lo + 1:hi + 1]))
                top1.append(rows.argmax(axis=1))
        evaluated += w.end - w.begin
    seconds = time.perf_counter() - t0
    empty = np.zeros(0, np.int64)
    return Result(np.concatenate(parts) if parts else empty.astype(np.float64),
                  np.concatenate(top1) if top1 else empty, evaluated, len(ws), seconds, ctx,
                  stride, len(ids))


def add_arguments(p) -> None:
    """The options beyond the model's (cli._add_model_args)."""
    p.add_argument("--text", required=True, metavar="FILE",
                   help="a UTF-8 text file (data/texts/us-public-domain.txt: ~2,700 tokens)")
    p.add_argument("--ctx", type=_at_least(2), default=512,
                   help="tokens per window (the KV cache is this long)")
    p.add_argument("--stride", type=_at_least(1), default=None,
                   help="tokens between window starts (default: ctx / 2); every window but "
                   "the first scores its last `stride` tokens")
    p.add_argument("--batch", type=_at_least(1), default=128,
                   help="rows per forward (all their logits are gathered on rank 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _at_least(k: int):
    import argparse

    def convert(text: str) -> int:
        value = int(text)
        if value < k:
            raise argparse.ArgumentTypeError(f"must be >= {k}, got {value}")
        return value
    convert.__name__ = "int"
    return convert


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise DllamaError(f"text file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise DllamaError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DllamaError(f"cannot read {path}: {e.strerror}") from None


def run_perplexity(args, run) -> int:
    """Every rank. `run`: the command line's RunConfig (max_seq_len and prefill_chunk are
    set here: ctx and batch)."""
    import dataclasses
    stride = args.stride or max(1, args.ctx // 2)
    run = dataclasses.replace(run, max_seq_len=args.ctx, prefill_chunk=min(args.batch, args.ctx))
    text = {}

    def check():            # on the root, before anything loads
        if stride > args.ctx:
            raise DllamaError(f"--stride {stride} > --ctx {args.ctx}: tokens between windows "
                              "would never be scored")
        text["value"] = _read_text(args.text)
        from .. import registry
        from ..formats import open_model
        model = open_model(registry.resolve(args.model))
        n = model.config.context_length
        model.close()
        if n and args.ctx > n:
            raise DllamaError(f"--ctx {args.ctx} exceeds the model's context length {n}")

    session = start(make_comm(), args.model, run, kv_dir=args.kv_cache_dir,
                    tokenizer_path=args.tokenizer, root_check=check)

    def body(s):
        ids = s.tokenizer.encode(text["value"])
        if len(ids) < 2:
            raise DllamaError(f"{args.text}: {len(ids)} token(s); perplexity needs at least 2")
        return evaluate(s.engine, ids, args.ctx, stride, s.run.prefill_chunk)

    def report(r: Result, steps) -> None:
        info = dict(n_ranks=session.comm.size, nthreads=session.nthreads,
                    weights_float_type=session.run.weights_float_type,
                    output_float_type=session.run.output_float_type,
                    buffer_float_type=session.run.buffer_float_type)
        if args.json:
            sys.stdout.write(json.dumps(dict(
                perplexity=r.perplexity, perplexity_stderr=r.stderr, mean_nll=r.mean_nll,
                tokens=r.n_tokens, tokens_scored=int(r.nll.size),
                tokens_evaluated=r.tokens_evaluated, windows=r.windows, ctx=r.ctx,
                stride=r.stride, seconds=r.seconds, tokens_per_s=r.tokens_per_s, **info)) + "\n")
            return
        print(f"perplexity: {r.perplexity:.4f} ± {r.stderr:.4f} ({r.nll.size} tokens scored; "
              f"{r.windows} windows of {r.ctx} tokens, stride {r.stride}; mean NLL "
              f"{r.mean_nll:.5f})")
        print(f"speed: {r.tokens_evaluated} tokens evaluated in {r.seconds:.2f} s, "
              f"{r.tokens_per_s:.1f} tok/s ({info['n_ranks']} ranks x {info['nthreads']} "
              f"threads; weights {info['weights_float_type']}, output "
              f"{info['output_float_type']}, wire {info['buffer_float_type']})")

    return run_root(session, body, report)
