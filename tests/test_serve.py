"""The OpenAI-compatible server (dllama_mpi.apps.serve) against a fake scheduler: through the
official openai client on a real uvicorn (127.0.0.1, port 0) and through Starlette's
TestClient."""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient

from dllama_mpi.apps.serve import create_app, run_server
from dllama_mpi.config import SamplingParams
from dllama_mpi.errors import DllamaError
from fake_scheduler import FakeScheduler, FakeTokenizer

pytestmark = pytest.mark.timeout(120)

MODEL = "fake-model"
CTX = 256
TOK = FakeTokenizer()


def chat_prompt(content: str) -> str:
    return TOK.apply_chat_template([{"role": "user", "content": content}])


def wait_for(predicate, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture
def make_scheduler():
    """FakeSchedulers with run() on a background thread (as the real one owns the main thread
    of rank 0); all closed and joined at the end."""
    started = []

    def make(**kwargs):
        s = FakeScheduler(max_seq_len=CTX, **kwargs)
        t = threading.Thread(target=s.run, daemon=True)
        t.start()
        started.append((s, t))
        return s

    yield make
    for s, t in started:
        s.close(cancel=True)
        t.join(10)
        assert not t.is_alive()


@pytest.fixture
def sched(make_scheduler):
    return make_scheduler()


@pytest.fixture
def client(sched):
    with TestClient(create_app(sched, TOK, MODEL, CTX, poll_seconds=0.05)) as c:
        yield c


class LiveServer:
    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        assert wait_for(lambda: self.server.started, 20), "uvicorn did not start"
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive()


@pytest.fixture
def live(make_scheduler):
    """(base url, scheduler) of a real uvicorn serving the app."""
    servers = []

    def start(**kwargs):
        s = make_scheduler(**kwargs)
        srv = LiveServer(create_app(s, TOK, MODEL, CTX, poll_seconds=0.05))
        servers.append(srv)
        return srv.url, s

    yield start
    for srv in servers:
        srv.stop()


def oa_client(url, **kw):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=kw.pop("api_key", "none"),
                         max_retries=0, timeout=20, **kw)


# ---------------------------------------------------------------------------------------------
# through the openai client, real HTTP
# ---------------------------------------------------------------------------------------------
def test_models_and_health(live):
    url, _ = live()
    models = oa_client(url).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{url}/health", timeout=10).json() == {"status": "ok"}


def test_chat_non_stream(live):
    url, sched = live()
    r = oa_client(url).chat.completions.create(
        model="anything", messages=[{"role": "user", "content": "hello"}], seed=5)
    prompt = chat_prompt("hello")
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL
    assert isinstance(r.created, int)
    (choice,) = r.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == prompt[::-1]
    assert choice.finish_reason == "stop"
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(prompt)
    assert r.usage.total_tokens == 2 * len(prompt)
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    # the scheduler got the chat-templated prompt and the request's sampling
    _, tokens, params = sched.submitted[-1]
    assert tokens == TOK.encode(prompt)
    assert params.seed == 5 and params.temperature == 1.0 and params.max_tokens == CTX - len(prompt)


def test_chat_stream_with_usage(live):
    url, _ = live()
    stream = oa_client(url).chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "be brief"},
                               {"role": "user", "content": "hi"}],
        max_tokens=7, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    prompt = TOK.apply_chat_template([{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": "hi"}])
    assert text == prompt[::-1][:7]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert chunks[-1].usage.prompt_tokens == len(prompt)
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_non_stream_and_stream(live):
    url, _ = live()
    c = oa_client(url)
    r = c.completions.create(model=MODEL, prompt="abcdef")
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.choices[0].text == "fedcba" and r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (6, 6)
    r = c.completions.create(model=MODEL, prompt="abcdef", max_tokens=2)
    assert r.choices[0].text == "fe" and r.choices[0].finish_reason == "length"
    chunks = list(c.completions.create(model=MODEL, prompt="abcdef", stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == "fedcba"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len(chunks) >= 6                      # streamed token by token


def test_stop_strings(live):
    url, _ = live()
    c = oa_client(url)
    # "hello world" reversed is "dlrow olleh": "ol" first occurs after "dlrow "
    r = c.completions.create(model=MODEL, prompt="hello world", stop=["ol", "zz"])
    assert r.choices[0].text == "dlrow " and r.choices[0].finish_reason == "stop"
    chunks = list(c.completions.create(model=MODEL, prompt="hello world", stop="ol", stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == "dlrow "
    assert chunks[-1].choices[0].finish_reason == "stop"
    # a stop-string prefix held back at the end of a length-limited stream comes out at the end
    chunks = list(c.completions.create(model=MODEL, prompt="hello world", stop="oX",
                                       max_tokens=3, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == "dlr"
    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ab"}],
                                            stop=["ba"], stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == chat_prompt("ab")[::-1].split("ba")[0]


def test_n_and_prompt_lists(live):
    url, sched = live()
    c = oa_client(url)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "xy"}], n=3)
    prompt = chat_prompt("xy")
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert all(ch.message.content == prompt[::-1] for ch in r.choices)
    assert r.usage.prompt_tokens == len(prompt)              # the prompt counted once
    assert r.usage.completion_tokens == 3 * len(prompt)
    r = c.completions.create(model=MODEL, prompt=["ab", "cde"], n=2)
    assert [(ch.index, ch.text) for ch in r.choices] == [(0, "ba"), (1, "ba"), (2, "edc"), (3, "edc")]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (5, 10)
    r = c.completions.create(model=MODEL, prompt=[ord("a"), ord("b")])
    assert r.choices[0].text == "ba"
    chunks = list(c.completions.create(model=MODEL, prompt="abc", n=2, stream=True))
    for i in (0, 1):
        mine = [ch.choices[0] for ch in chunks if ch.choices[0].index == i]
        assert "".join(x.text for x in mine) == "cba" and mine[-1].finish_reason == "stop"


def test_logprobs_shapes(live):
    url, _ = live()
    c = oa_client(url)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "q"}],
                                  logprobs=True, top_logprobs=2, max_tokens=4)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    assert "".join(x.token for x in content) == r.choices[0].message.content
    for x in content:
        assert x.logprob == -0.5 and x.bytes == list(x.token.encode())
        assert len(x.top_logprobs) == 2 and x.top_logprobs[0].token == x.token
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "q"}])
    assert r.choices[0].logprobs is None
    r = c.completions.create(model=MODEL, prompt="abcd", logprobs=3)
    lp = r.choices[0].logprobs
    assert lp.tokens == list("dcba") and lp.token_logprobs == [-0.5] * 4
    assert lp.text_offset == [0, 1, 2, 3]
    assert [len(t) for t in lp.top_logprobs] == [3] * 4 and lp.top_logprobs[0]["d"] == -0.5
    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "q"}],
                                            logprobs=True, max_tokens=3, stream=True))
    entries = [e for ch in chunks if ch.choices and ch.choices[0].logprobs
               for e in ch.choices[0].logprobs.content]
    assert len(entries) == 3 and all(e.top_logprobs == [] for e in entries)


def test_openai_client_errors(live):
    url, _ = live()
    c = oa_client(url)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 300}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                  response_format={"type": "json_schema",
                                                   "json_schema": {"schema": {}}})
    assert e.value.param == "response_format.json_schema.name"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("other-model")
    assert c.models.retrieve(MODEL).id == MODEL
    assert c.completions.create(model=MODEL, prompt="ok").choices[0].text == "ko"


def test_disconnect_cancels_stream(live):
    url, sched = live(delay=0.02, reply=lambda prompt: [ord("z")] * 10_000)
    with httpx.stream("POST", f"{url}/v1/completions", timeout=10,
                      json={"model": MODEL, "prompt": "long", "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and '"z"' in line:
                break
    assert wait_for(lambda: len(sched.cancelled) == 1, 10), "the request was not cancelled"
    rid = sched.submitted[-1][0]
    assert sched.cancelled == [rid] and rid.startswith("cmpl-")
    assert wait_for(lambda: sched.requests_running == 0, 5)
    assert sched.finished[-1].finish_reason == "cancelled"
    assert len(sched.finished[-1].generated_tokens) < 10_000


def test_disconnect_cancels_non_stream(live):
    url, sched = live(delay=0.02, reply=lambda prompt: [ord("z")] * 10_000)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", timeout=0.5,
                   json={"messages": [{"role": "user", "content": "hi"}]})
    assert wait_for(lambda: len(sched.cancelled) == 1, 10), "the request was not cancelled"
    assert sched.cancelled[0].startswith("chatcmpl-")


# ---------------------------------------------------------------------------------------------
# through TestClient
# ---------------------------------------------------------------------------------------------
def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_testclient_stream_shapes(client):
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "abc"}], "max_tokens": 3,
                             "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "usage" not in chunks[0]                 # only with stream_options.include_usage
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "length"
    with client.stream("POST", "/v1/completions",
                       json={"prompt": "abc", "stream": True,
                             "stream_options": {"include_usage": True}}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]" and events[-2]["choices"] == []
    assert events[-2]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                                   "prompt_tokens_details": {"cached_tokens": 0}}
    assert all(e["usage"] is None for e in events[:-2])


def test_cached_tokens_reported(client):
    client.post("/v1/completions", json={"prompt": "abcdef"})
    r = client.post("/v1/completions", json={"prompt": "abcdefgh"}).json()
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 6


BAD_BODIES = [
    ("/v1/chat/completions", {"model": MODEL}, "messages"),
    ("/v1/chat/completions", {"messages": "hello"}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages.[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": -1},
     "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 1000}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": "yes"},
     "stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "frequency_penalty": 1}, "frequency_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema", "json_schema": {}}},
     "response_format.json_schema.name"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema"}}, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "xml"}}, "response_format.type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema", "json_schema": {
                                  "name": "x", "schema": "{}"}}},
     "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "min_p": 1.5},
     "min_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 30, "logprobs": True}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ("/v1/completions", {"model": MODEL}, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": [0x110000]}, "prompt"),
]


@pytest.mark.parametrize("path,body,param", BAD_BODIES)
def test_bad_bodies_are_400(client, path, body, param):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param
    # and the server goes on serving
    ok = client.post("/v1/completions", json={"prompt": "ab"})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "ba"


def test_malformed_requests(client):
    for content in (b"{", b"[1, 2]", b"\xff\xfe", b""):
        r = client.post("/v1/chat/completions", content=content,
                        headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/v1/completions", json={"prompt": "x" * CTX})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = client.post("/v1/completions", json={"prompt": "x" * (CTX - 1), "max_tokens": 100})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "max_tokens"
    r = client.post("/v1/completions", json={"prompt": "x" * (CTX - 1)})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 1    # no max_tokens: the room left
    r = client.post("/v1/nothing", json={})
    assert r.status_code == 404 and r.json()["error"]["message"] == "Invalid URL (POST /v1/nothing)"
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    assert client.get("/health").status_code == 200


def test_scheduler_error_is_400(make_scheduler):
    class Refusing(FakeScheduler):
        def submit(self, *a, **k):
            raise DllamaError("the engine says no")

    s = Refusing(max_seq_len=CTX)
    with TestClient(create_app(s, TOK, MODEL, CTX)) as c:
        r = c.post("/v1/completions", json={"prompt": "ab"})
        assert r.status_code == 400 and r.json()["error"]["message"] == "the engine says no"
        r = c.post("/v1/completions", json={"prompt": "ab", "n": 2, "stream": True})
        assert r.status_code == 400


def test_partial_submit_failure_cancels_the_rest(sched):
    real_submit, calls = sched.submit, []

    def submit(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise DllamaError("no second slot")
        return real_submit(*a, **k)

    sched.submit = submit
    sched.delay = 0.02
    sched.reply = lambda p: [ord("z")] * 1000
    with TestClient(create_app(sched, TOK, MODEL, CTX)) as c:
        r = c.post("/v1/completions", json={"prompt": "ab", "n": 2})
    assert r.status_code == 400
    assert wait_for(lambda: len(sched.cancelled) == 1)


def test_api_key(sched):
    with TestClient(create_app(sched, TOK, MODEL, CTX, api_key="sekrit")) as c:
        assert c.get("/v1/models").status_code == 401
        r = c.post("/v1/completions", json={"prompt": "ab"},
                   headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = c.post("/v1/completions", json={"prompt": "ab"},
                   headers={"Authorization": "Bearer sekrit"})
        assert r.status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200


def test_api_key_openai_client(make_scheduler):
    s = make_scheduler()
    srv = LiveServer(create_app(s, TOK, MODEL, CTX, api_key="sekrit"))
    try:
        with pytest.raises(openai.AuthenticationError):
            oa_client(srv.url, api_key="wrong").models.list()
        assert oa_client(srv.url, api_key="sekrit").models.list().data[0].id == MODEL
    finally:
        srv.stop()


def test_defaults_and_sampling_fields(sched):
    defaults = SamplingParams(temperature=0.3, top_p=0.7, top_k=5, seed=11, max_tokens=2)
    with TestClient(create_app(sched, TOK, MODEL, CTX, defaults=defaults)) as c:
        r = c.post("/v1/completions", json={"prompt": "abcd"}).json()
        assert r["choices"][0]["text"] == "dc"
        p = sched.submitted[-1][2]
        assert (p.temperature, p.top_p, p.top_k, p.seed, p.max_tokens) == (0.3, 0.7, 5, 11, 2)
        c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "temperature": 0, "top_p": 1,
            "top_k": -1, "seed": -1, "max_completion_tokens": 9, "max_tokens": 3,
            "stop": "q", "ignore_eos": True, "user": "u", "unknown_field": 1})
        p = sched.submitted[-1][2]
        assert (p.temperature, p.top_p, p.top_k, p.seed, p.max_tokens) == (0.0, 1.0, 0, 2**63 - 1, 9)
        assert p.stop == ("q",) and p.ignore_eos
        assert p.min_p == 0.0 and p.response_format is None
        schema = {"type": "object", "properties": {"b": {"type": "integer"},
                                                   "a": {"type": "string"}}}
        c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "min_p": 0.05,
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "s", "description": "ignored", "schema": schema, "strict": True}}})
        p = sched.submitted[-1][2]
        assert p.min_p == 0.05
        assert json.loads(p.response_format) == {"type": "json_schema", "json_schema": {
            "name": "s", "schema": schema, "strict": True}}
        assert list(json.loads(p.response_format)["json_schema"]["schema"]["properties"]) == \
            ["b", "a"]                    # the schema's order: properties are generated in it
        c.post("/v1/completions", json={"prompt": "x", "response_format": {"type": "json_object"}})
        assert json.loads(sched.submitted[-1][2].response_format) == {"type": "json_object"}
        c.post("/v1/completions", json={"prompt": "x", "response_format": {"type": "text"}})
        assert sched.submitted[-1][2].response_format is None


def test_metrics(client):
    client.post("/v1/completions", json={"prompt": "abc"})
    with client.stream("POST", "/v1/completions", json={"prompt": "abcd", "stream": True}) as r:
        sse_events(r)
    client.post("/v1/completions", json={"prompt": 5})
    text = client.get("/metrics").text
    assert 'dllama_requests_total{endpoint="/v1/completions",status="200"} 2.0' in text
    assert 'dllama_requests_total{endpoint="/v1/completions",status="400"} 1.0' in text
    assert "dllama_generation_tokens_total 7.0" in text
    assert "dllama_prompt_tokens_total 7.0" in text
    assert 'dllama_sequences_finished_total{finish_reason="stop"} 2.0' in text
    assert "dllama_time_to_first_token_seconds_count 2.0" in text
    assert "dllama_inter_token_latency_seconds_count 5.0" in text
    assert "dllama_requests_running 0.0" in text and "dllama_requests_waiting 0.0" in text
    assert "dllama_scheduler_generated_tokens_total 7.0" in text
    assert "dllama_scheduler_steps_total" in text


# ---------------------------------------------------------------------------------------------
# run_server: the scheduler on the main thread, uvicorn in a thread, stopped by SIGINT
# ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_server_serves_and_stops_on_sigint(capfd):
    assert threading.current_thread() is threading.main_thread()
    sched = FakeScheduler(max_seq_len=CTX, delay=0.02, reply=lambda p: [ord("z")] * 100_000)
    port = free_port()
    seen = {}

    def client_side():
        url = f"http://127.0.0.1:{port}"
        try:
            if not wait_for(lambda: _up(url), 20):
                return
            seen["text"] = oa_client(url).completions.create(model=MODEL, prompt="abc",
                                                             max_tokens=3).choices[0].text
            # a stream still running when the signal comes is cancelled, not waited for
            with httpx.stream("POST", f"{url}/v1/completions", timeout=20,
                              json={"prompt": "abc", "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        os.kill(os.getpid(), signal.SIGINT)
                        break
        finally:
            seen["done"] = True

    t = threading.Thread(target=client_side, daemon=True)
    t.start()
    before = signal.getsignal(signal.SIGINT)
    start = time.monotonic()
    run_server(sched, TOK, MODEL, CTX, "127.0.0.1", port)
    assert time.monotonic() - start < 60
    t.join(20)
    assert seen.get("done") and seen.get("text") == "zzz"
    assert signal.getsignal(signal.SIGINT) is before
    assert len(sched.cancelled) == 1
    err = capfd.readouterr().err
    assert f"serving {MODEL} on http://127.0.0.1:{port}/v1" in err


def _up(url) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_run_server_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        sched = FakeScheduler(max_seq_len=CTX)
        with pytest.raises(DllamaError, match="cannot serve"):
            run_server(sched, TOK, MODEL, CTX, "127.0.0.1", port)


# ---------------------------------------------------------------------------------------------
# the schema module alone (the batch command reuses it)
# ---------------------------------------------------------------------------------------------
def test_schema_imports_without_fastapi():
    import subprocess
    import sys
    code = ("import sys, dllama_mpi.apps.openai_schema as s; "
            "assert 'fastapi' not in sys.modules and 'uvicorn' not in sys.modules; "
            "b = s.CompletionRequest.model_validate({'prompt': 'x', 'max_tokens': 3, 'stop': 'y'}); "
            "p = s.to_sampling_params(b, None); assert (p.max_tokens, p.stop) == (3, ('y',))")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_non_finite_logprobs_stay_json():
    from dllama_mpi.apps import openai_schema as oa
    entries = [(1, float("-inf"), [(1, float("-inf")), (2, -1.0)])]
    chat = oa.chat_logprobs(entries, str)
    legacy = oa.completion_logprobs(entries, str)
    json.dumps([chat, legacy], allow_nan=False)
    assert chat["content"][0]["logprob"] == -9999.0
    assert legacy["top_logprobs"][0] == {"1": -9999.0, "2": -1.0}


@pytest.mark.slow
def test_real_tokenizer(make_scheduler):
    """SmolLM2's tokenizer: the chat template's tokens reach the scheduler, token strings of
    logprobs are the tokenizer's pieces."""
    from dllama_mpi.tokenizer import Tokenizer
    from tiny import smollm2_path
    tok = Tokenizer.from_gguf(smollm2_path())
    answer = tok.encode("Paris, of course.", add_bos=False)
    s = make_scheduler(reply=lambda p: answer, token_text=lambda t: tok.decode([t]))
    with TestClient(create_app(s, tok, "smollm2", 2048)) as c:
        msgs = [{"role": "user", "content": "Capital of France?"}]
        r = c.post("/v1/chat/completions", json={"messages": msgs, "logprobs": True}).json()
    assert r["choices"][0]["message"]["content"] == "Paris, of course."
    assert "".join(e["token"] for e in r["choices"][0]["logprobs"]["content"]) == "Paris, of course."
    assert s.submitted[-1][1] == tok.encode(tok.apply_chat_template(msgs))
    assert r["usage"]["completion_tokens"] == len(answer)
