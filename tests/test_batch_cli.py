"""`batch`: a prompts file in, a results file out; bad input gets a clear error and no output."""
import json

import pytest

from dllama_mpi.comm import SerialComm
from test_cli import assert_clean_error, run, tiny  # noqa: F401  (fixture)
from tiny import our_greedy


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


@pytest.mark.parametrize("ranks", [None, 3])
def test_batch_results_equal_each_prompt_alone(tiny, tmp_path, ranks):  # noqa: F811
    from dllama_mpi.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(tiny)
    texts = ["hello world", "abc", "a much longer prompt than the others, to prefill", "x"]
    inp = _write(tmp_path / "in.jsonl",
                 [json.dumps({"id": f"p{i}", "prompt": t, "max_tokens": 6 + 3 * i})
                  for i, t in enumerate(texts)] + ["", json.dumps({"prompt": "tail"})])
    out = tmp_path / "out.jsonl"
    p = run("batch", "--model", tiny, "--input", inp, "--output", str(out), "--parallel", "2",
            "--temperature", "0", "--weights-float-type", "f32", "--max-seq-len", "64",
            "--steps", "5", ranks=ranks)
    assert p.returncode == 0, p.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in results] == ["p0", "p1", "p2", "p3", None]
    assert [r["index"] for r in results] == list(range(5))
    for r, text, steps in zip(results, texts + ["tail"], [6, 9, 12, 15, 5]):
        ids = tok.encode(text)
        assert r["prompt_tokens"] == len(ids)
        expected = our_greedy(SerialComm(), tiny, ids, steps, max_seq_len=64)
        stop = next((i for i, t in enumerate(expected) if t in tok.eos_ids), len(expected))
        assert r["generated_tokens"] == expected[:stop]
        assert r["text"] == tok.decode(r["generated_tokens"])
        assert r["finish_reason"] == ("stop" if stop < len(expected) else "length")
    assert "aggregate" in p.stderr


@pytest.mark.parametrize("line,words", [
    ('{"prompt": "ok"', ["line 2", "not valid JSON"]),
    ('["prompt"]', ["line 2", "JSON object"]),
    ('{"prompt": 5}', ["line 2", "non-empty string"]),
    ('{"prompt": "a", "messages": []}', ["line 2", "exactly one"]),
    ('{"messages": [{"role": "user"}]}', ["line 2", "messages"]),
    ('{"prompt": "a", "max_tokens": 0}', ["line 2", "max_tokens"]),
    ('{"prompt": "a", "temprature": 1}', ["line 2", "unknown keys temprature"]),
])
def test_batch_bad_line_clear_error_and_no_output(tiny, tmp_path, line, words):  # noqa: F811
    inp = _write(tmp_path / "in.jsonl", ['{"prompt": "fine"}', line])
    out = tmp_path / "out.jsonl"
    out.write_text("previous results\n")
    p = run("batch", "--model", tiny, "--input", inp, "--output", str(out), ranks=2)
    assert_clean_error(p, *words)
    assert out.read_text() == "previous results\n"          # untouched
    assert sorted(f.name for f in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_batch_prompt_too_long_and_missing_input(tiny, tmp_path):  # noqa: F811
    inp = _write(tmp_path / "in.jsonl", ['{"prompt": "short"}', json.dumps({"prompt": "y" * 200})])
    out = tmp_path / "out.jsonl"
    p = run("batch", "--model", tiny, "--input", inp, "--output", str(out), "--max-seq-len", "64")
    assert_clean_error(p, "line 2", "max-seq-len")
    assert not out.exists()
    p = run("batch", "--model", tiny, "--input", str(tmp_path / "nope.jsonl"), "--output", str(out))
    assert_clean_error(p, "cannot read", "nope.jsonl")
    p = run("batch", "--model", tiny, "--input", inp, "--output", str(tmp_path / "no" / "o.jsonl"))
    assert_clean_error(p, "not a writable folder")
