"""`perplexity`: the windows score every token once; a tiny random Llama's perplexity equals
the one computed from `transformers`' logits over the same windows; the command line's
output and its errors."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from dllama_mpi.apps.perplexity import evaluate, token_nll, windows
from dllama_mpi.comm import SerialComm
from dllama_mpi.config import RunConfig
from tiny import SHAPES, hf_model

TEXT = ("It was the best of times, it was the worst of times; the quick brown fox jumps over "
        "the lazy dog while seven wise owls count the stars. ") * 3
SHAPE = "gqa6"


@pytest.mark.parametrize("n,ctx,stride", [(2, 4, 2), (10, 4, 2), (11, 4, 4), (100, 16, 5),
                                          (7, 16, 8), (33, 8, 1)])
def test_windows_score_every_token_once(n, ctx, stride):
    ws = windows(n, ctx, stride)
    scored = [t for w in ws for t in range(w.scored, w.end)]
    # windows that do not overlap (stride == ctx) cannot score their first token
    assert scored == [t for t in range(1, n) if stride < ctx or t % stride]
    assert ws[-1].end == n and all(w.end - w.begin <= ctx for w in ws)
    assert all(w.scored - w.begin >= min(ctx - stride, w.scored) for w in ws)  # context kept


def test_token_nll():
    logits = np.array([[0.0, math.log(3.0)], [5.0, 5.0]], np.float32)
    assert token_nll(logits, [1, 0]) == pytest.approx([math.log(4 / 3), math.log(2)], rel=1e-6)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny random Llama of tests/tiny.py (F32) with the byte-level BPE tokenizer."""
    from dllama_mpi.testing import write_llama_gguf
    s = dict(SHAPES[SHAPE])
    m = hf_model(SHAPE, seed=1)
    tensors = {k: v.detach().float().numpy() for k, v in m.state_dict().items()}
    path = str(tmp_path_factory.mktemp("ppl") / "tiny.gguf")
    write_llama_gguf(path, **s, context_length=256, tensors=tensors, weight_type="f32",
                     tokenizer="bytes")
    return path


def reference(ids, ctx, stride) -> float:
    """Perplexity from transformers' logits over the same windows."""
    import torch
    m = hf_model(SHAPE, seed=1)
    nll = []
    for w in windows(len(ids), ctx, stride):
        with torch.no_grad():
            logits = m(torch.tensor([ids[w.begin:w.end]])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        for t in range(w.scored, w.end):
            nll.append(-float(logp[t - 1 - w.begin, ids[t]]))
    return math.exp(sum(nll) / len(nll)), len(nll)


@pytest.mark.parametrize("ctx,stride,batch", [(64, 32, 128), (48, 20, 16), (256, 256, 7),
                                              (100, 100, 30)])
def test_perplexity_of_a_tiny_model_equals_transformers(model, ctx, stride, batch):
    from dllama_mpi.runtime.startup import start
    s = start(SerialComm(), model, RunConfig(weights_float_type="f32", max_seq_len=ctx,
                                              prefill_chunk=batch, nthreads=1))
    ids = s.tokenizer.encode(TEXT)
    r = evaluate(s.engine, ids, ctx, stride, batch)
    ref, n = reference(ids, ctx, stride)
    unscored = 1 if stride < ctx else len(windows(len(ids), ctx, stride))  # windows' first
    assert r.nll.size == n == len(ids) - unscored
    assert r.perplexity == pytest.approx(ref, rel=1e-5)
    assert r.stderr > 0


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dllama_mpi", "perplexity", *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_json_and_text(model, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    p = run_cli("--model", model, "--text", str(text), "--ctx", "64", "--stride", "32",
                "--weights-float-type", "f32", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    from dllama_mpi.tokenizer import Tokenizer
    ids = Tokenizer.from_gguf(model).encode(TEXT)
    assert out["perplexity"] == pytest.approx(reference(ids, 64, 32)[0], rel=1e-5)
    assert out["tokens_scored"] == len(ids) - 1 and out["windows"] == len(windows(len(ids), 64, 32))
    p = run_cli("--model", model, "--text", str(text), "--ctx", "64")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("perplexity: ") and "± " in p.stdout and "tok/s" in p.stdout


def assert_one_error(p, *words):
    """Non-zero exit, one `error:` line (after, at most, start-up's stage lines), no
    traceback."""
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr
    for w in words:
        assert w in errors[0], errors[0]


def test_cli_errors(model, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    assert_one_error(run_cli("--model", model, "--text", str(tmp_path / "none.txt")), "not found")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    assert_one_error(run_cli("--model", model, "--text", str(tmp_path / "bin.txt")), "UTF-8")
    assert_one_error(run_cli("--model", model, "--text", str(text), "--ctx", "16",
                             "--stride", "17"), "--stride")
    assert_one_error(run_cli("--model", model, "--text", str(text), "--ctx", "1000"),
                     "--ctx 1000 exceeds the model's context length 256")
    assert_one_error(run_cli("--model", model, "--text", str(text), "--ctx", "1"), "--ctx")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    assert_one_error(run_cli("--model", model, "--text", str(tmp_path / "empty.txt"),
                             "--ctx", "64"), "at least 2")
