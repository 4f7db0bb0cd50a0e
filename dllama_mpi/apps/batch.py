"""`batch`: a file of prompts (JSON Lines) -> a file of completions, with up to --parallel
sequences decoding together (continuous batching, generation.generate_batch).

Input, one JSON object per line (blank lines skipped):
    {"prompt": "text"}  or  {"messages": [{"role": "user", "content": "..."}, ...]}
    optional: "id" (any JSON value, echoed), "max_tokens" (default --steps)
Output, one JSON object per input line, in input order:
    {"id", "index", "text", "prompt_tokens", "generated_tokens", "finish_reason"}
The whole input is checked before the model is loaded (a bad line: its number and what is
wrong); the output is written to a temporary file beside it and renamed at the end, so it
is either complete or absent.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass

from ..comm import make_comm
from ..errors import DllamaError
from ..runtime.generation import generate_batch
from ..runtime.startup import run_root, start
from ..sampler import Sampler


@dataclass
class Request:
    line: int
    id: object
    prompt: str | None
    messages: list | None
    max_tokens: int


def read_requests(path: str, default_max_tokens: int) -> list[Request]:
    """Parse and check every line; DllamaError naming the first bad line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise DllamaError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise DllamaError(f"{path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    requests = []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        where = f"{path} line {number}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DllamaError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DllamaError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - {"id", "prompt", "messages", "max_tokens"})
        if unknown:
            raise DllamaError(f"{where}: unknown keys {', '.join(unknown)}")
        prompt, messages = obj.get("prompt"), obj.get("messages")
        if (prompt is None) == (messages is None):
            raise DllamaError(f"{where}: needs exactly one of \"prompt\" or \"messages\"")
        if prompt is not None and (not isinstance(prompt, str) or not prompt):
            raise DllamaError(f"{where}: \"prompt\" must be a non-empty string")
        if messages is not None and not (
                isinstance(messages, list) and messages and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str) for m in messages)):
            raise DllamaError(f"{where}: \"messages\" must be a non-empty list of "
                              "{\"role\": str, \"content\": str}")
        texts = [prompt] if prompt is not None else [m["content"] for m in messages]
        if any("\0" in t for t in texts):
            raise DllamaError(f"{where}: the prompt contains a NUL character")
        max_tokens = obj.get("max_tokens", default_max_tokens)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise DllamaError(f"{where}: \"max_tokens\" must be a positive integer")
        requests.append(Request(number, obj.get("id"), prompt, messages, max_tokens))
    if not requests:
        raise DllamaError(f"{path} holds no prompts")
    return requests


def _check_output(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise DllamaError(f"cannot write {path}: {folder} is not a writable folder")


def write_atomically(path: str, lines: list[str]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".dllama-batch-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def run_batch(args, run) -> int:
    comm = make_comm()
    requests: list[Request] = []

    def read_input() -> None:
        requests.extend(read_requests(args.input, args.steps))
        _check_output(args.output)

    session = start(comm, args.model, run, kv_dir=args.kv_cache_dir,
                    tokenizer_path=args.tokenizer, root_check=read_input)

    def report(result, steps) -> None:
        n_prompt = sum(len(g.prompt_tokens) for g in result.generations)
        n_gen = sum(len(g.generated_tokens) for g in result.generations)
        print(f"{len(result.generations)} sequences, {run.parallel} at a time: prompts "
              f"{n_prompt} tokens in {result.prefill_seconds:.2f} s; decode "
              f"{result.decode_tokens} tokens in {result.decode_steps} steps, "
              f"{result.decode_tokens_per_s:.1f} tok/s aggregate; {n_gen} tokens generated in "
              f"{result.seconds:.2f} s -> {args.output}", file=sys.stderr)

    return run_root(session, lambda s: _complete(s, args, requests), report)


def _complete(session, args, requests: list[Request]):
    """Root: every request through continuous batching, then the results file."""
    tok, run = session.tokenizer, session.run
    prompts = []
    for r in requests:
        text = (tok.apply_chat_template(r.messages) if r.messages is not None else
                tok.apply_chat_template([{"role": "user", "content": r.prompt}]) if args.chat
                else r.prompt)
        ids = tok.encode(text)
        if len(ids) >= session.max_seq_len:
            raise DllamaError(f"{args.input} line {r.line}: the prompt has {len(ids)} tokens; "
                              f"--max-seq-len is {session.max_seq_len}")
        prompts.append(ids)
    samplers = [Sampler(run.temperature, run.topp, run.topk,
                        None if run.seed is None else run.seed + i) for i in range(len(prompts))]
    stop_ids = set() if args.ignore_eos else set(tok.eos_ids)
    done = [0]

    def progress(index, gen) -> None:
        done[0] += 1
        if not args.quiet:
            print(f"[{done[0]}/{len(prompts)}] line {requests[index].line}: "
                  f"{len(gen.generated_tokens)} tokens ({gen.finish_reason})", file=sys.stderr)

    result = generate_batch(session.engine, prompts, [r.max_tokens for r in requests], samplers,
                            stop_ids, session.max_seq_len, run.parallel, run.prefill_chunk,
                            on_done=progress)
    lines = [json.dumps({"id": r.id, "index": i, "text": tok.decode(g.generated_tokens),
                         "prompt_tokens": len(g.prompt_tokens),
                         "generated_tokens": g.generated_tokens,
                         "finish_reason": g.finish_reason})
             for i, (r, g) in enumerate(zip(requests, result.generations))]
    try:
        write_atomically(args.output, lines)
    except OSError as e:
        raise DllamaError(f"cannot write {args.output}: {e.strerror}") from None
    return result
