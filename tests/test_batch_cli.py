"""`batch` as a user runs it (the tiny model): the three input formats, one record per request
in the OpenAI Batch output shape, error records for bad lines while the rest runs, resuming an
output (torn last line, duplicates), the order rewrite, and fatal errors that leave files alone."""
import json

import pytest

from dllama_mpi.comm import SerialComm
from test_cli import assert_clean_error, run
from tiny import our_greedy

CTX = 64
F32 = ("--weights-float-type", "f32", "--max-seq-len", str(CTX), "--nthreads", "1")


def write_tiny(path) -> str:
    """A tiny random Llama with a byte-level BPE tokenizer (the test_cli model)."""
    from dllama_mpi.testing import random_llama_tensors, write_llama_gguf
    shape = dict(dim=96, hidden_dim=160, n_layers=2, n_heads=3, n_kv_heads=1, vocab_size=400)
    write_llama_gguf(str(path), **shape, context_length=128, weight_type="f32", tokenizer="bytes",
                     tensors=random_llama_tensors(**shape, std=0.1, seed=3))
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("batch") / "tiny.gguf")


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def read_records(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def by_id(path) -> dict:
    records = read_records(path)
    ids = [r["custom_id"] for r in records]
    assert len(ids) == len(set(ids)), f"a custom_id has two records: {ids}"
    return {r["custom_id"]: r for r in records}


def text_of(record) -> str:
    choice = record["response"]["body"]["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def batch(tiny, inp, out, *extra, ranks=None, **kw):
    return run("batch", "--model", tiny, "--input", str(inp), "--output", str(out), *F32,
               "--temperature", "0", *extra, ranks=ranks, **kw)


@pytest.mark.parametrize("ranks", [None, 3])
def test_simple_jsonl_results_equal_each_prompt_alone(tiny, tmp_path, ranks):
    from dllama_mpi.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(tiny)
    texts = ["hello world", "abc", "a much longer prompt than the others, to prefill", "x"]
    inp = _write(tmp_path / "in.jsonl",
                 [json.dumps({"id": f"p{i}", "prompt": t, "max_tokens": 6 + 3 * i})
                  for i, t in enumerate(texts)] + ["", json.dumps({"prompt": "tail"})])
    out = tmp_path / "out.jsonl"
    p = batch(tiny, inp, out, "--max-batch", "2", "--steps", "5", ranks=ranks)
    assert p.returncode == 0, p.stderr
    records = by_id(out)
    assert sorted(records) == ["line-6", "p0", "p1", "p2", "p3"]
    for cid, text, steps in zip(["p0", "p1", "p2", "p3", "line-6"], texts + ["tail"],
                                [6, 9, 12, 15, 5]):
        r = records[cid]
        assert r["error"] is None and r["response"]["status_code"] == 200
        body = r["response"]["body"]
        assert body["object"] == "text_completion" and body["model"] == "tiny"
        ids = tok.encode(text)
        expected = our_greedy(SerialComm(), tiny, ids, steps, max_seq_len=CTX)
        stop = next((i for i, t in enumerate(expected) if t in tok.eos_ids), len(expected))
        assert body["usage"]["prompt_tokens"] == len(ids)
        assert body["usage"]["completion_tokens"] == stop
        assert text_of(r) == tok.decode(expected[:stop])
        assert body["choices"][0]["finish_reason"] == ("stop" if stop < len(expected) else "length")
    assert "5 ok, 0 failed" in p.stderr and "aggregate" in p.stderr


def test_text_and_openai_formats(tiny, tmp_path):
    prompts = ["The sky is", "", "Once upon a time"]
    inp = _write(tmp_path / "in.txt", prompts)
    out = tmp_path / "out.jsonl"
    p = batch(tiny, inp, out, "--steps", "4", "--chat")
    assert p.returncode == 0, p.stderr
    text = by_id(out)
    assert sorted(text) == ["line-1", "line-3"]
    assert text["line-1"]["response"]["body"]["object"] == "chat.completion"
    # the same prompts as OpenAI lines give the same answers
    oa = _write(tmp_path / "in.jsonl", [json.dumps({
        "custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": t}], "max_tokens": 4}})
        for cid, t in [("line-1", prompts[0]), ("line-3", prompts[2])]])
    out2 = tmp_path / "out2.jsonl"
    p = batch(tiny, oa, out2, "--input-format", "openai")
    assert p.returncode == 0, p.stderr
    assert {k: text_of(v) for k, v in by_id(out2).items()} == \
        {k: text_of(v) for k, v in text.items()}


BAD = [('{"prompt": "ok"', "invalid_json"),
       ('["prompt"]', "invalid_request"),
       ('{"prompt": 5}', "invalid_request"),
       ('{"prompt": "a", "messages": []}', "invalid_request"),
       ('{"messages": [{"role": "user"}]}', "invalid_request"),
       ('{"messages": [{"role": "robot", "content": "x"}]}', "invalid_body"),
       ('{"prompt": "a", "max_tokens": 0}', "invalid_request"),
       ('{"prompt": "a", "temprature": 1}', "invalid_request"),
       (json.dumps({"prompt": "y" * 200}), "context_length_exceeded")]


@pytest.mark.parametrize("errors_file", [False, True])
def test_bad_lines_get_error_records_and_the_rest_runs(tiny, tmp_path, errors_file):
    lines = ['{"prompt": "fine", "id": "good1"}'] + [b for b, _ in BAD] + \
            ['{"prompt": "also fine", "id": "good2"}']
    inp = _write(tmp_path / "in.jsonl", lines)
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    extra = ("--errors", str(err)) if errors_file else ()
    p = batch(tiny, inp, out, "--steps", "3", *extra, ranks=2)
    assert p.returncode == 0, p.stderr
    assert f"2 ok, {len(BAD)} failed" in p.stderr
    records = by_id(out)
    errors = by_id(err) if errors_file else records
    assert records["good1"]["error"] is None and records["good2"]["error"] is None
    for number, (_, code) in enumerate(BAD, 2):
        r = errors[f"line-{number}"]
        assert r["error"]["code"] == code, r
        assert r["response"]["status_code"] == 400
        assert r["response"]["body"]["error"]["message"] == r["error"]["message"]
    if errors_file:
        assert sorted(records) == ["good1", "good2"]


def test_duplicates_are_error_records_and_stay_once(tiny, tmp_path):
    inp = _write(tmp_path / "in.jsonl", ['{"id": "a", "prompt": "one"}',
                                         '{"id": "b", "prompt": "two"}',
                                         '{"id": "a", "prompt": "three"}',
                                         '{"id": "a", "prompt": "four"}'])
    out = tmp_path / "out.jsonl"
    assert batch(tiny, inp, out, "--steps", "2").returncode == 0
    first = read_records(out)
    a = [r for r in first if r["custom_id"] == "a"]
    assert len(first) == 4 and len(a) == 3
    dups = [r for r in a if r["error"]]
    assert [r["error"]["code"] for r in dups] == ["duplicate_custom_id"] * 2
    assert ["line 3" in dups[0]["error"]["message"], "line 4" in dups[1]["error"]["message"]] \
        == [True, True] and all("on line 1" in r["error"]["message"] for r in dups)
    p = batch(tiny, inp, out, "--steps", "2")                 # nothing left to do
    assert p.returncode == 0 and "0 ok, 0 failed, 4 already done" in p.stderr
    assert read_records(out) == first


def test_resume_after_a_torn_last_line(tiny, tmp_path):
    inp = _write(tmp_path / "in.txt", [f"prompt number {i}" for i in range(8)])
    full = tmp_path / "full.jsonl"
    assert batch(tiny, inp, full, "--steps", "6", "--max-batch", "3").returncode == 0
    lines = full.read_bytes().splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"".join(lines[:4]) + lines[4][:30])          # 4 whole records, one torn
    p = batch(tiny, inp, out, "--steps", "6", "--max-batch", "3", "--output-order", "input")
    assert p.returncode == 0, p.stderr
    assert "dropped a torn last line" in p.stderr and "4 already done" in p.stderr
    got, want = by_id(out), by_id(full)
    assert list(got) == [f"line-{i}" for i in range(1, 9)]        # rewritten in input order
    assert {k: text_of(v) for k, v in got.items()} == {k: text_of(v) for k, v in want.items()}
    for k in list(got)[:4]:
        assert got[k] == want[k]                                  # kept as they were


def test_fatal_errors_leave_files_alone(tiny, tmp_path):
    inp = _write(tmp_path / "in.jsonl", ['{"prompt": "fine"}'])
    out = tmp_path / "out.jsonl"
    out.write_text("previous results\n")
    assert_clean_error(batch(tiny, inp, out, ranks=2), "not a batch output")
    assert out.read_text() == "previous results\n"
    assert_clean_error(batch(tiny, tmp_path / "nope.jsonl", tmp_path / "o.jsonl"),
                       "cannot read", "nope.jsonl")
    assert_clean_error(batch(tiny, inp, tmp_path / "no" / "o.jsonl"), "not a writable folder")
    assert_clean_error(batch(tiny, inp, inp), "different files")
    assert_clean_error(batch(tiny, _write(tmp_path / "e.txt", ["", "  "]), tmp_path / "o.jsonl"),
                       "holds no requests")
    p = run("batch", "--model", str(tmp_path / "missing.gguf"), "--input", inp, "--output",
            str(tmp_path / "new.jsonl"))
    assert_clean_error(p, "missing.gguf")                # no empty output left behind
    assert sorted(f.name for f in tmp_path.iterdir()) == ["e.txt", "in.jsonl", "out.jsonl"]
