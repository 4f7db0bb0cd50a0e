"""A batch record's response is what the server answers to the same request: the same status
and body (its id and created time aside), successes and refusals alike. Through the fake
scheduler (every body field, fast), and through the real command on the tiny model."""
import json
import threading

import pytest
from fastapi.testclient import TestClient

from dllama_mpi.apps import batch_io
from dllama_mpi.apps import batch_records as rec
from dllama_mpi.apps.batch_loop import BatchLoop, StopFlag
from dllama_mpi.apps.serve import create_app
from dllama_mpi.config import SamplingParams
from fake_scheduler import FakeScheduler, FakeTokenizer

pytestmark = pytest.mark.timeout(300)

CTX = 64
TOK = FakeTokenizer()
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
DEFAULTS = SamplingParams(temperature=0.0, top_p=0.9, max_tokens=6)


def _user(text):
    return [{"role": "user", "content": text}]


REQUESTS = [
    (CHAT, {"messages": _user("hello"), "max_tokens": 5}),
    (COMPLETIONS, {"prompt": "abcdef", "stop": ["c"]}),
    (COMPLETIONS, {"prompt": ["one", "two"], "n": 2, "max_tokens": 3}),
    (COMPLETIONS, {"prompt": [104, 105, 106]}),
    (CHAT, {"messages": _user("logs"), "logprobs": True, "top_logprobs": 2, "max_tokens": 3}),
    (COMPLETIONS, {"prompt": "lp", "logprobs": 1, "max_tokens": 4}),
    (COMPLETIONS, {"prompt": "x" * 60, "max_tokens": 50}),            # capped at the room left
    (CHAT, {"messages": [{"role": "system", "content": "be brief"}] + _user("sys"),
            "max_completion_tokens": 2, "seed": 5, "temperature": 0.7}),
    # refusals: the server's 400 bodies
    (COMPLETIONS, {"prompt": "y" * 80}),                              # context_length_exceeded
    (CHAT, {"messages": _user("t"), "temperature": "hot"}),
    (CHAT, {"messages": _user("t"), "presence_penalty": 1}),
    (COMPLETIONS, {"prompt": "t", "n": 17}),
    (CHAT, {"messages": [{"role": "tool", "content": "x"}]}),          # the template refuses
    (CHAT, {"messages": _user("t"), "response_format": {"type": "json_object"}}),
    (COMPLETIONS, {"prompt": ["a", "b", "c", "d", "e"], "n": 16}),     # > 64 sequences
    (COMPLETIONS, {"prompt": ""}),
    (CHAT, {"messages": []}),
]


def _normal(body):
    """A response body without what differs between two answers to one request."""
    body = json.loads(json.dumps(body))
    for key in ("id", "created"):
        body.pop(key, None)
    return body


def server_answers(requests):
    sched = FakeScheduler(max_seq_len=CTX, n_slots=1)
    thread = threading.Thread(target=sched.run, daemon=True)
    thread.start()
    try:
        with TestClient(create_app(sched, TOK, "fake", CTX, defaults=DEFAULTS,
                                   poll_seconds=0.05)) as c:
            return [(r.status_code, r.json()) for r in
                    (c.post(url, json=body) for url, body in requests)]
    finally:
        sched.close(cancel=True)
        thread.join(10)


class _Quiet:
    def skip(self):
        pass

    def record(self, ok, tokens):
        pass

    def tick(self):
        pass


def run_batch_loop(tmp_path, requests, max_batch=1, name="out.jsonl"):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": url,
                                       "body": body}) + "\n"
                           for i, (url, body) in enumerate(requests)))
    out = str(tmp_path / name)
    writer = rec.RecordWriter(out)
    loop = BatchLoop(FakeScheduler(max_seq_len=CTX, n_slots=max_batch), TOK, CTX,
                     batch_io.read_items(str(inp), "openai"), rec.Done(), writer, None,
                     DEFAULTS, None, max_batch, "fake", StopFlag(), _Quiet())
    stats = loop.run()
    writer.close()
    records = {}
    for line in open(out):
        r = json.loads(line)
        records[r["custom_id"]] = r
    return stats, records


def test_batch_answers_as_the_server(tmp_path):
    expected = server_answers(REQUESTS)
    assert sum(status == 200 for status, _ in expected) == 8
    stats, records = run_batch_loop(tmp_path, REQUESTS)
    assert (stats.ok, stats.failed) == (8, len(REQUESTS) - 8)
    for i, (status, body) in enumerate(expected):
        r = records[f"r{i}"]
        assert r["response"]["status_code"] == status, (i, r)
        assert _normal(r["response"]["body"]) == _normal(body), i
        assert (r["error"] is None) == (status == 200)
        if status != 200:
            assert r["error"]["message"] == body["error"]["message"]
            assert r["error"]["code"]


def test_batch_with_several_in_flight_gives_the_same_texts(tmp_path):
    _, one = run_batch_loop(tmp_path, REQUESTS, max_batch=1, name="one.jsonl")
    _, many = run_batch_loop(tmp_path, REQUESTS, max_batch=8, name="many.jsonl")
    assert one.keys() == many.keys()
    for cid in one:
        a, b = _normal(one[cid]["response"]["body"]), _normal(many[cid]["response"]["body"])
        for body in (a, b):
            body.get("usage", {}).pop("prompt_tokens_details", None)   # the prefix cache differs
        assert a == b, cid


def test_real_model_batch_equals_server(tmp_path):
    """The command (one process, the tiny model) against the server over the same engine."""
    from dllama_mpi.comm import SerialComm
    from dllama_mpi.config import RunConfig
    from dllama_mpi.runtime.scheduler import Scheduler
    from dllama_mpi.runtime.startup import start
    from test_cli import run
    from test_batch_cli import write_tiny

    tiny = write_tiny(tmp_path / "tiny.gguf")
    requests = [
        (CHAT, {"messages": _user("hello there"), "max_tokens": 6, "temperature": 0}),
        (COMPLETIONS, {"prompt": "The cat", "max_tokens": 8, "temperature": 0, "logprobs": 2}),
        (COMPLETIONS, {"prompt": ["ab", "abc"], "n": 2, "max_tokens": 4, "temperature": 0.9,
                       "seed": 11}),
        (CHAT, {"messages": _user("q"), "logprobs": True, "top_logprobs": 1, "max_tokens": 3,
                "stop": ["e"], "temperature": 0}),
        (COMPLETIONS, {"prompt": "z" * 200}),
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": u,
                                       "body": b}) + "\n" for i, (u, b) in enumerate(requests)))
    out = tmp_path / "out.jsonl"
    p = run("batch", "--model", tiny, "--input", str(inp), "--output", str(out),
            "--max-batch", "1", "--weights-float-type", "f32", "--max-seq-len", str(CTX),
            "--nthreads", "1", "--temperature", "0.8", "--topp", "0.9", "--steps", "7",
            "--model-name", "tiny")
    assert p.returncode == 0, p.stderr
    records = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}

    s = start(SerialComm(), tiny, RunConfig(weights_float_type="f32", max_seq_len=CTX,
                                            nthreads=1, parallel=1))
    sched = Scheduler(s.engine, n_slots=1, max_seq_len=CTX, eos_ids=s.tokenizer.eos_ids,
                      decoder_factory=s.tokenizer.decoder)
    thread = threading.Thread(target=sched.run, daemon=True)
    thread.start()
    defaults = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=7)
    try:
        with TestClient(create_app(sched, s.tokenizer, "tiny", CTX, defaults=defaults)) as c:
            answers = [c.post(u, json=b) for u, b in requests]
    finally:
        sched.close(cancel=True)
        thread.join(30)
    for i, a in enumerate(answers):
        r = records[f"r{i}"]
        assert r["response"]["status_code"] == a.status_code, i
        assert _normal(r["response"]["body"]) == _normal(a.json()), i
