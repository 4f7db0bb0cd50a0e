"""Structured output (dllama_mpi/grammar.py + the scheduler's mask) and min_p.

Sampler: min_p and the mask against a numpy reference of the distribution the sampler
draws from (recovered exactly through a fake generator), greedy picks the best allowed token.
Real scheduler over a tiny random Llama (its "bytes" tokenizer): generated text parses and
validates against several schemas, for several prompts and seeds, at temperature 0 and 1;
the chosen token is the best allowed one at temperature 0; logprobs stay the raw model's;
bad schemas are a DllamaError at submit. The official openai client against create_app on
that scheduler. SmolLM2 (slow): the same validity on a real model and vocabulary."""
from __future__ import annotations

import json
import threading
import time

import jsonschema
import numpy as np
import pytest

from dllama_mpi.comm import SerialComm
from dllama_mpi.config import RunConfig, SamplingParams
from dllama_mpi.errors import DllamaError
from dllama_mpi.grammar import WHITESPACE_MAX, GrammarCompiler, response_format_text, schema_of
from dllama_mpi.runtime.startup import scheduler_for, start
from dllama_mpi.sampler import Sampler, log_softmax, masked
from tiny import smollm2_path, write_cli_gguf

pytestmark = pytest.mark.timeout(600)


def json_schema(schema: dict, strict: bool = True) -> str:
    return response_format_text({"type": "json_schema", "json_schema": {
        "name": "test", "schema": schema, "strict": strict}})


JSON_OBJECT = response_format_text({"type": "json_object"})

# bounded schemas: a random model cannot wander forever inside them
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}
FLAGS = {"type": "object", "properties": {
    "ok": {"type": "boolean"}, "kind": {"enum": ["x", "y", "zz"]}, "none": {"type": "null"},
    "const": {"const": "k"}},
    "required": ["ok", "kind", "none", "const"], "additionalProperties": False}
NESTED = {"type": "object", "properties": {
    "point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -9, "maximum": 9},
        "y": {"type": "integer", "minimum": -9, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False},
    "label": {"anyOf": [{"type": "string", "maxLength": 4},
                        {"type": "integer", "minimum": 0, "maximum": 99}]}},
    "required": ["point", "label"], "additionalProperties": False}
DIGITS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
          "minItems": 1, "maxItems": 4}
SCHEMAS = {"person": PERSON, "flags": FLAGS, "nested": NESTED, "digits": DIGITS}


# ---------------------------------------------------------------------------------------------
# the sampler: min_p and the mask against numpy references
# ---------------------------------------------------------------------------------------------
class RecordingRng:
    """Stands in for the sampler's generator: choice() returns index `k` and keeps p."""
    def __init__(self, k):
        self.k, self.p = k, None

    def choice(self, n, p):
        self.p = np.asarray(p)
        return self.k if self.k < n else 0


def drawn_distribution(sampler: Sampler, logits, allowed=None) -> np.ndarray:
    """The exact distribution over token ids the sampler draws from: index k of its
    candidates is token sampler(...) when its generator returns k, with probability p[k]."""
    dist = np.zeros(logits.size)
    k = 0
    while True:
        sampler.rng = RecordingRng(k)
        token = sampler(logits, allowed)
        if k >= sampler.rng.p.size:
            return dist
        dist[token] += sampler.rng.p[k]
        k += 1


def reference(logits, temperature, top_k=0, top_p=1.0, min_p=0.0, allowed=None) -> np.ndarray:
    """numpy: mask -> temperature -> top-k -> top-p -> min-p, over the whole vocabulary."""
    z = np.asarray(logits, np.float64) / temperature
    if allowed is not None:
        z = np.where(allowed, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_k:
        p[np.argsort(-p, kind="stable")[top_k:]] = 0
        p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        cut = np.zeros_like(p, bool)
        cut[order[int(np.searchsorted(cum, top_p)) + 1:]] = True
        p[cut] = 0
        p /= p.sum()
    if min_p:
        p[p < min_p * p.max()] = 0
        p /= p.sum()
    return p


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 1.0, 0.05), (1.0, 0, 1.0, 0.3), (0.7, 0, 1.0, 0.1), (1.5, 10, 1.0, 0.2),
    (1.0, 0, 0.9, 0.1), (1.0, 0, 1.0, 1.0), (1.0, 0, 1.0, 0.0)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_min_p_and_mask_against_numpy(temperature, top_k, top_p, min_p, with_mask):
    rng = np.random.default_rng(7)
    for _ in range(5):
        logits = (rng.standard_normal(64) * 3).astype(np.float32)
        allowed = rng.random(64) < 0.4 if with_mask else None
        s = Sampler(temperature, top_p, top_k, 0, min_p)
        got = drawn_distribution(s, logits, allowed)
        want = reference(logits, temperature, top_k, top_p, min_p, allowed)
        np.testing.assert_allclose(got, want, atol=1e-12)
        if with_mask:
            assert got[~allowed].sum() == 0
        if min_p:                                 # nothing below min_p x the top survives
            kept = got > 0
            assert got[kept].min() >= min_p * got.max() * (1 - 1e-12)


def test_min_p_draws_follow_the_reference():
    """A seeded sampler's empirical frequencies match the reference distribution."""
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal(20) * 2).astype(np.float32)
    want = reference(logits, 1.0, min_p=0.1)
    s = Sampler(1.0, 1.0, 0, 123, 0.1)
    n = 20000
    counts = np.bincount([s(logits) for _ in range(n)], minlength=20) / n
    assert counts[want == 0].sum() == 0
    assert np.abs(counts - want).max() < 4 * np.sqrt(want.max() / n) + 1e-3


def test_mask_greedy_picks_the_best_allowed_token():
    rng = np.random.default_rng(0)
    for _ in range(50):
        logits = rng.standard_normal(300).astype(np.float32)
        allowed = rng.random(300) < 0.1
        allowed[rng.integers(300)] = True
        best = int(np.flatnonzero(allowed)[np.argmax(logits[allowed])])
        assert Sampler(0.0)(logits, allowed) == best
        assert Sampler(0.0, min_p=0.5)(logits, allowed) == best
        assert masked(lambda z: int(np.argmax(z)), logits, allowed) == best   # own samplers
        assert allowed[Sampler(1.0, seed=1)(logits, allowed)]
    with pytest.raises(DllamaError):
        Sampler(0.0)(np.zeros(5, np.float32), np.zeros(5, bool))


def test_params_carry_min_p_and_check_it():
    s = Sampler.from_params(SamplingParams(temperature=1.0, min_p=0.25, seed=1))
    assert s.min_p == 0.25
    for bad in (-0.1, 1.5):
        with pytest.raises(DllamaError, match="min_p"):
            SamplingParams(min_p=bad).check()


# ---------------------------------------------------------------------------------------------
# response_format's frozen form
# ---------------------------------------------------------------------------------------------
def test_response_format_text():
    assert response_format_text(None) is None
    assert response_format_text({"type": "text"}) is None
    assert json.loads(JSON_OBJECT) == {"type": "json_object"}
    text = json_schema({"type": "object", "properties": {"z": {}, "a": {}}})
    hash(text)
    schema, strict = schema_of(text)
    assert list(schema["properties"]) == ["z", "a"] and strict is True
    assert schema_of(json_schema({"type": "object"}, strict=False))[1] is False
    assert schema_of(JSON_OBJECT) == ({"type": "object"}, True)
    for bad in ({"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema",
                "json_schema": {"schema": 5}}, "json_object"):
        with pytest.raises(DllamaError):
            response_format_text(bad)


# ---------------------------------------------------------------------------------------------
# a tiny random Llama and the real scheduler
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_session(tmp_path_factory):
    path = write_cli_gguf(str(tmp_path_factory.mktemp("grammar") / "tiny.gguf"),
                          context_length=512)
    return start(SerialComm(), path, RunConfig(max_seq_len=512, nthreads=1, parallel=3))


@pytest.fixture(scope="module")
def tiny_sched(tiny_session):
    """The module's scheduler (3 KV slots); the openai test's server has its own."""
    return scheduler_for(tiny_session)


def tiny_prompts(tok):
    return [tok.encode("hello world"), tok.encode("abc"),
            tok.encode(tok.apply_chat_template([{"role": "user", "content": "json please"}]))]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_tiny_output_parses_and_validates(tiny_session, tiny_sched, name):
    tok, schema = tiny_session.tokenizer, SCHEMAS[name]
    rf = json_schema(schema)
    for i, prompt in enumerate(tiny_prompts(tok)):
        for temperature, seed in [(0.0, None), (1.0, i), (1.0, 10 + i), (1.0, 20 + i)]:
            c = tiny_sched.generate(prompt, SamplingParams(
                temperature=temperature, top_p=1.0, seed=seed, max_tokens=400,
                response_format=rf))
            assert c.finish_reason == "stop", (c.finish_reason, c.error, c.text)
            value = json.loads(c.text)
            jsonschema.validate(value, schema)
            assert tok.decode(c.generated_tokens) == c.text


def test_tiny_json_object(tiny_session, tiny_sched):
    """Any JSON object: a random model may ramble inside a string until max_tokens; what it
    wrote is then a prefix the grammar accepts. When it stops, the text is a JSON object."""
    tok = tiny_session.tokenizer
    stopped = 0
    for prompt in tiny_prompts(tok):
        for temperature, seed in [(0.0, None), (1.0, 0), (1.0, 1), (1.0, 2)]:
            c = tiny_sched.generate(prompt, SamplingParams(
                temperature=temperature, top_p=1.0, seed=seed, max_tokens=100,
                response_format=JSON_OBJECT))
            if c.finish_reason == "stop":
                stopped += 1
                assert isinstance(json.loads(c.text), dict)
            else:
                assert c.finish_reason == "length"
                m = tiny_sched.grammar.matcher(JSON_OBJECT)
                assert all(m.accept(t) for t in c.generated_tokens)
    assert stopped >= 6


def test_tiny_greedy_takes_the_best_allowed_token_and_raw_logprobs(tiny_session, tiny_sched,
                                                                   monkeypatch):
    """Replaying the logits rows the scheduler saw through a fresh matcher: each chosen token
    is the argmax of the allowed ones; the reported logprob is the raw model's log-softmax."""
    rows, events = [], []
    take = tiny_sched._take
    monkeypatch.setattr(tiny_sched, "_take",
                        lambda s, row: (rows.append(np.array(row, copy=True)), take(s, row)))
    rf = json_schema(PERSON)
    c = tiny_sched.generate(tiny_prompts(tiny_session.tokenizer)[0], SamplingParams(
        temperature=0, max_tokens=400, response_format=rf, logprobs=True, top_logprobs=3),
        on_token=events.append)
    assert c.finish_reason == "stop" and len(rows) == len(c.generated_tokens)
    m = tiny_sched.grammar.matcher(rf)
    free = 0
    for row, token, ev in zip(rows, c.generated_tokens, events):
        allowed = m.allowed(row.size)
        assert allowed[token]
        assert token == int(np.flatnonzero(allowed)[np.argmax(row[allowed])])
        free += token == int(np.argmax(row))
        lp = log_softmax(row)
        assert ev.token == token and ev.logprob == pytest.approx(lp[token], abs=1e-9)
        assert ev.top_logprobs[0][1] == pytest.approx(lp.max(), abs=1e-9)
        assert m.accept(token)
    assert m.done
    assert free < len(rows)                 # the random model alone would not write this JSON


def test_tiny_mask_at_temperature_one_never_leaves_the_grammar(tiny_session, tiny_sched):
    """With min_p and top-k too: every token of every seed is one the grammar allowed."""
    rf = json_schema(NESTED)
    tok = tiny_session.tokenizer
    for seed in range(4):
        c = tiny_sched.generate(tiny_prompts(tok)[1], SamplingParams(
            temperature=1.3, top_p=0.95, top_k=50, min_p=0.02, seed=seed, max_tokens=400,
            response_format=rf))
        m = tiny_sched.grammar.matcher(rf)
        for t in c.generated_tokens:
            assert m.allowed()[t] and m.accept(t)
        assert c.finish_reason == "stop" and m.done
        jsonschema.validate(json.loads(c.text), NESTED)


def test_tiny_whitespace_is_bounded(tiny_session):
    compiler = GrammarCompiler(tiny_session.tokenizer)
    tok = tiny_session.tokenizer
    for n, ok in ((WHITESPACE_MAX, True), (WHITESPACE_MAX + 1, False)):
        m = compiler.matcher(JSON_OBJECT)
        ids = tok.encode("{" + " " * n + "}", add_bos=False)
        assert all(m.accept(t) for t in ids) is ok
        if ok:
            assert m.done
    # a schema's own x-guidance options replace the bound: here, no whitespace at all
    own = json_schema({"type": "object", "x-guidance": {"whitespace_flexible": False}})
    for text, ok in (('{"a":1}', True), ('{ "a":1}', False)):
        m = compiler.matcher(own)
        assert all(m.accept(t) for t in tok.encode(text, add_bos=False)) is ok


def test_bad_schemas_are_errors_at_submit(tiny_session, tiny_sched):
    prompt = tiny_prompts(tiny_session.tokenizer)[0]
    bad = [{"type": "foo"}, {"type": "string", "pattern": "(("},
           {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
           {"type": "array", "uniqueItems": True}]          # strict: not enforceable
    for schema in bad:
        with pytest.raises(DllamaError, match="response_format"):
            tiny_sched.submit(prompt, SamplingParams(response_format=json_schema(schema)))
    # not strict: keywords llguidance cannot enforce are ignored
    c = tiny_sched.generate(prompt, SamplingParams(
        temperature=0, max_tokens=100, response_format=json_schema(
            {"type": "array", "items": {"enum": [1, 2]}, "maxItems": 2, "uniqueItems": True},
            strict=False)))
    assert c.finish_reason == "stop" and isinstance(json.loads(c.text), list)
    assert tiny_sched.requests_running == 0 and tiny_sched.requests_waiting == 0
    from dllama_mpi.runtime.scheduler import Scheduler
    bare = Scheduler(tiny_session.engine, n_slots=1, max_seq_len=64, eos_ids=[2])
    with pytest.raises(DllamaError, match="grammar"):
        bare.submit(prompt, SamplingParams(response_format=JSON_OBJECT))


def test_tiny_batched_constrained_and_free_sequences(tiny_session, tiny_sched):
    """Constrained and free sequences decode together in one step; each constrained one equals
    what it gives alone (greedy)."""
    tok = tiny_session.tokenizer
    prompts = tiny_prompts(tok)
    formats = [json_schema(PERSON), None, json_schema(DIGITS)]
    params = [SamplingParams(temperature=0, max_tokens=60, response_format=f) for f in formats]
    alone = [tiny_sched.generate(p, sp).generated_tokens for p, sp in zip(prompts, params)]
    steps, rows = tiny_sched.decode_steps_total, tiny_sched.decode_rows_total
    handles = [tiny_sched.submit(p, sp) for p, sp in zip(prompts, params)]
    while tiny_sched.step():
        pass
    assert tiny_sched.decode_rows_total - rows > tiny_sched.decode_steps_total - steps
    for h, want in zip(handles, alone):
        assert h.wait(0).generated_tokens == want


# ---------------------------------------------------------------------------------------------
# the official openai client against create_app over the real scheduler (one process)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_server(tiny_session, tiny_sched):
    import uvicorn

    from dllama_mpi.apps.serve import create_app
    sched = scheduler_for(tiny_session)       # fresh slots: nothing cached yet
    runner = threading.Thread(target=sched.run, daemon=True)
    runner.start()
    app = create_app(sched, tiny_session.tokenizer, "tiny", tiny_session.max_seq_len,
                     poll_seconds=0.05)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(15)
    sched.close(cancel=True)
    runner.join(15)
    assert not runner.is_alive()
    for slot in tiny_sched.slots:             # what tiny_sched's slots held was overwritten
        slot.tokens.clear()


def test_openai_client_json_schema_end_to_end(tiny_server):
    import openai
    client = openai.OpenAI(base_url=tiny_server, api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "a person please"}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                  "strict": True}}
    r = client.chat.completions.create(model="tiny", messages=messages, response_format=fmt,
                                       n=2, seed=4, temperature=1.0, max_tokens=400)
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    greedy = client.chat.completions.create(model="tiny", messages=messages,
                                            response_format=fmt, temperature=0, max_tokens=400)
    stream = client.chat.completions.create(model="tiny", messages=messages,
                                            response_format=fmt, temperature=0, max_tokens=400,
                                            stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == greedy.choices[0].message.content
    jsonschema.validate(json.loads(streamed), PERSON)
    obj = client.completions.create(model="tiny", prompt="hello", temperature=0,
                                    max_tokens=200, extra_body={
                                        "response_format": {"type": "json_object"},
                                        "min_p": 0.1})
    assert isinstance(json.loads(obj.choices[0].text), dict)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=messages, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}})
    assert "response_format" in bad.value.message
    # and the server goes on serving
    again = client.chat.completions.create(model="tiny", messages=messages,
                                           response_format=fmt, temperature=0, max_tokens=400)
    assert again.choices[0].message.content == greedy.choices[0].message.content


# ---------------------------------------------------------------------------------------------
# SmolLM2: a real vocabulary and model (slow)
# ---------------------------------------------------------------------------------------------
SMOL_SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "city": {"type": "string", "maxLength": 20}},
        "required": ["name", "age", "city"], "additionalProperties": False},
    "list": {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "string", "maxLength": 16},
                  "minItems": 1, "maxItems": 4}},
        "required": ["items"], "additionalProperties": False},
    "answer": {"type": "object", "properties": {
        "answer": {"enum": ["yes", "no", "maybe"]},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["answer", "confidence"], "additionalProperties": False},
}
SMOL_PROMPTS = ["Describe a fictional person as JSON.",
                "List some fruits in JSON.",
                "Is the sky blue? Answer in JSON."]


@pytest.fixture(scope="module")
def smol_session():
    return start(SerialComm(), smollm2_path(), RunConfig(max_seq_len=512, nthreads=2))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMOL_SCHEMAS))
def test_smollm2_output_parses_and_validates(smol_session, name):
    sched = scheduler_for(smol_session)
    tok, schema = smol_session.tokenizer, SMOL_SCHEMAS[name]
    rf = json_schema(schema)
    for content in SMOL_PROMPTS[:2]:
        prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": content}]))
        for temperature, seed in [(0.0, None), (1.0, 1), (1.0, 2)]:
            c = sched.generate(prompt, SamplingParams(temperature=temperature, top_p=1.0,
                                                      seed=seed, max_tokens=200,
                                                      response_format=rf))
            assert c.finish_reason == "stop", (c.finish_reason, c.text)
            jsonschema.validate(json.loads(c.text), schema)


@pytest.mark.slow
def test_smollm2_json_object(smol_session):
    sched = scheduler_for(smol_session)
    tok = smol_session.tokenizer
    # (unbounded, a 135M model may repeat itself inside an object until max_tokens: this
    # prompt ends at temperature 0)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": SMOL_PROMPTS[1]}]))
    free = sched.generate(prompt, SamplingParams(temperature=0, max_tokens=40))
    c = sched.generate(prompt, SamplingParams(temperature=0, max_tokens=300,
                                              response_format=JSON_OBJECT))
    assert c.finish_reason == "stop" and isinstance(json.loads(c.text), dict), c.text
    assert not free.text.startswith("{"), free.text    # alone, the model writes prose first
