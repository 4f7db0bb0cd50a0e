"""SmolLM2 served on 2 ranks, driven by the official `openai` client as a user would: streamed
text equals non-streamed text at temperature 0, n=2, a stop string split across tokens,
usage and logprobs, 8 clients at once each getting what the same request gets alone, JSON
schema output that parses and validates, and a client that goes away frees its slot. Then `chat` in a pseudo-terminal: two turns, /reset,
Ctrl-C in the middle of an answer."""
import concurrent.futures
import os
import pty
import select
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from test_serve_engine import Server
from tiny import smollm2_path

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
KEY = "test-key"


@pytest.fixture(scope="module")
def client():
    server = Server(smollm2_path(), ranks=2, extra=["--parallel", "8", "--max-seq-len", "1024"])
    try:
        yield openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=300)
    finally:
        code = server.stop()
        assert code == 0, "".join(server.err)


def ask(client, content, **kw):
    return client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": content}], temperature=0,
        **{"max_tokens": 24, **kw})


def test_streamed_equals_non_streamed_and_usage(client):
    r = ask(client, "What is the capital of France?")
    text = r.choices[0].message.content
    assert text and r.usage.completion_tokens == 24
    chunks = list(ask(client, "What is the capital of France?", stream=True,
                      stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_n_logprobs_and_a_stop_string_across_tokens(client):
    r = ask(client, "Name three colours.", n=2, logprobs=True, top_logprobs=3)
    a, b = (c.message.content for c in r.choices)
    assert a == b                                  # greedy: the same twice
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens // 2
    for entry in lp:
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True) and entry.logprob <= 0
        assert entry.logprob >= tops[-1] - 1e-6    # greedy: the chosen one is the best
    full = ask(client, "What is the capital of France?", logprobs=True)
    pieces = [t.token for t in full.choices[0].logprobs.content]
    text = full.choices[0].message.content
    assert "".join(pieces) == text
    i = next(i for i in range(3, len(pieces) - 1)
             if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[i][-2:] + pieces[i + 1][:2]       # the end of one token, the start of the next
    r = ask(client, "What is the capital of France?", stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[:text.index(stop)]


def test_eight_clients_at_once_get_what_they_get_alone(client):
    prompts = [f"Write one sentence about the number {i}." for i in range(8)]
    alone = [ask(client, p).choices[0].message.content for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: ask(client, p).choices[0].message.content, prompts))
    assert together == alone


def test_json_schema_output_parses_and_validates(client):
    """response_format on 2 ranks (the grammar masks on the root; the worker only follows):
    several schemas and prompts, greedy and sampled, every answer parses and validates; an
    invalid schema is a 400 and the server goes on."""
    import json

    import jsonschema

    from test_grammar import SMOL_PROMPTS, SMOL_SCHEMAS
    jobs = [(name, prompt, temperature, seed) for name in sorted(SMOL_SCHEMAS)
            for prompt in SMOL_PROMPTS for temperature, seed in ((0, None), (1.0, 7))]

    def one(job):
        name, prompt, temperature, seed = job
        return client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": prompt}],
            temperature=temperature, seed=seed, max_tokens=200,
            response_format={"type": "json_schema", "json_schema": {
                "name": name, "schema": SMOL_SCHEMAS[name], "strict": True}})

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(one, jobs))
    for (name, *_), r in zip(jobs, answers):
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SMOL_SCHEMAS[name])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "x"}], max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {
                "name": "bad", "schema": {"type": "integer", "minimum": "zero"}}})
    # any object: unbounded, so a 135M model may repeat itself until max_tokens
    r = ask(client, "List some fruits in JSON.", max_tokens=300,
            response_format={"type": "json_object"})
    text = r.choices[0].message.content
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert r.choices[0].finish_reason == "length" and text.startswith("{")


def test_a_client_that_goes_away_frees_its_slot(client):
    base = str(client.base_url).rstrip("/")
    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as h:
        with h.stream("POST", base + "/chat/completions", json={
                "model": "smollm2", "stream": True, "max_tokens": 400,
                "messages": [{"role": "user", "content": "Tell me a long story."}]}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 3:
                    break                           # leave in the middle of the stream
        metrics = base.removesuffix("/v1") + "/metrics"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = h.get(metrics).text
            running = [line for line in text.splitlines()
                       if line.startswith("dllama_requests_running ")]
            if running and float(running[0].split()[1]) == 0:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the abandoned stream still holds its slot")
    assert ask(client, "What is the capital of France?").choices[0].message.content


def _read_until(fd, needle: bytes, seconds: float) -> bytes:
    out, deadline = b"", time.monotonic() + seconds
    while needle not in out and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                out += os.read(fd, 4096)
            except OSError:
                break
    return out


def test_chat_in_a_terminal():
    main, side = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "dllama_mpi", "chat", "--model",
                             smollm2_path(), "--temperature", "0", "--steps", "600",
                             "--max-seq-len", "2048"],
                            stdin=side, stdout=side, stderr=side, start_new_session=True)
    os.close(side)
    try:
        assert b"> " in _read_until(main, b"> ", 300)
        os.write(main, b"What is the capital of France?\n")
        first = _read_until(main, b"\n> ", 120)
        assert first.rstrip().endswith(b">") and len(first) > 40, first
        os.write(main, b"/reset\n")
        assert b"[conversation cleared]\r\n> " in _read_until(main, b"cleared]\r\n> ", 30)
        os.write(main, b"Write a very long story about a dragon.\n")
        echoed = _read_until(main, b"dragon.\r\n", 60)  # the terminal echoes the line
        tail = echoed.split(b"dragon.\r\n", 1)[1]
        for _ in range(60):                             # until the answer has started
            if len(tail) >= 20:
                break
            tail += _read_until(main, b"\0", 1)
        os.kill(proc.pid, signal.SIGINT)                 # what Ctrl-C sends
        cancelled = _read_until(main, b"[answer cancelled]", 60)
        assert b"[answer cancelled]" in cancelled
        if b"\n> " not in cancelled.split(b"[answer cancelled]", 1)[1]:
            _read_until(main, b"\n> ", 30)              # the prompt that follows it
        os.write(main, b"/reset\n")                       # the cancelled turn stays otherwise
        assert b"[conversation cleared]\r\n> " in _read_until(main, b"cleared]\r\n> ", 30)
        os.write(main, b"What is the capital of France?\n")
        again = _read_until(main, b"\n> ", 120)     # a fresh conversation: the same answer
        assert first.split(b"\n", 1)[1] in again, (first, again)
        os.write(main, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        os.close(main)
