"""Time to first token of each turn of a chat, with and without the prefix cache (one process).

    python bench/bench_prefix.py [--model smollm2-135m] [--turns 5] [--answer-tokens 48]
        [--nthreads 1]

A conversation of --turns user messages (~150 tokens each) in the model's chat template;
each turn's prompt is the whole conversation so far, answered greedily. With the cache, a
turn's prompt finds the previous turn's tokens in its KV slot and prefills only what is new;
without, it prefills everything. Prints per turn: prompt tokens, cached tokens, TTFT both
ways, and whether the answers are the same tokens (they must be).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dllama_mpi.comm import SerialComm  # noqa: E402
from dllama_mpi.config import RunConfig, SamplingParams  # noqa: E402
from dllama_mpi.runtime.scheduler import Scheduler  # noqa: E402
from dllama_mpi.runtime.startup import start  # noqa: E402

TOPICS = ["the water cycle", "how a compiler turns source code into machine code",
          "why the sky is blue", "the history of the printing press",
          "how vaccines train the immune system", "what a hash table is", "plate tectonics"]


def user_message(turn: int) -> str:
    topic = TOPICS[turn % len(TOPICS)]
    return (f"Here is my question number {turn + 1}. I am preparing a short talk for a group "
            f"of curious students and I would like to explain {topic} in plain words. Please "
            f"give me a clear explanation in a few sentences, mention one common "
            f"misconception about {topic} and how to correct it, and suggest a simple "
            f"experiment or everyday example that shows the idea. Keep it friendly, avoid "
            f"jargon where you can, and if you must use a technical term, define it in the "
            f"same sentence. Finally, propose one question I could ask the students at the "
            f"end to check that they understood {topic}.")


def conversation(s, args, prefix_cache: bool) -> list[dict]:
    tok = s.tokenizer
    sched = Scheduler(s.engine, n_slots=2, max_seq_len=s.max_seq_len, eos_ids=tok.eos_ids,
                      decoder_factory=tok.decoder, prefix_cache=prefix_cache)
    params = SamplingParams(temperature=0.0, max_tokens=args.answer_tokens)
    messages, turns = [], []
    for turn in range(args.turns):
        messages.append({"role": "user", "content": user_message(turn)})
        ids = tok.encode(tok.apply_chat_template(messages))
        c = sched.generate(ids, params)
        messages.append({"role": "assistant", "content": c.text})
        turns.append(dict(prompt=len(ids), cached=c.cached_tokens, ttft=c.prompt_seconds,
                          tokens=c.generated_tokens))
    return turns


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--answer-tokens", type=int, default=48)
    ap.add_argument("--nthreads", type=int, default=1)
    args = ap.parse_args()
    run = RunConfig(nthreads=args.nthreads, parallel=2, max_seq_len=2048)
    s = start(SerialComm(), args.model, run)
    s.engine.forward([1] * 64, 0)                      # warm-up
    cached = conversation(s, args, True)
    fresh = conversation(s, args, False)
    print(f"{args.turns} turns, answers of <= {args.answer_tokens} tokens "
          f"({s.config.n_layers} layers, dim {s.config.dim}, {s.nthreads} threads)")
    for i, (a, b) in enumerate(zip(cached, fresh), 1):
        print(f"turn {i}: prompt {a['prompt']} tokens, cached {a['cached']}; TTFT "
              f"{1e3 * a['ttft']:.0f} ms with the cache, {1e3 * b['ttft']:.0f} ms without; "
              f"same answer: {'yes' if a['tokens'] == b['tokens'] else 'NO'}", flush=True)


if __name__ == "__main__":
    main()
