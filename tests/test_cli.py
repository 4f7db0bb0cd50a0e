"""The command line as a user runs it: output, JSON schema, and clean errors."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dllama_mpi.comm import SerialComm
from tiny import our_greedy, write_cli_gguf, write_header_only_gguf

TIMEOUT = 300


def run(*args, ranks=None, **kw):
    cmd = [sys.executable, "-m", "dllama_mpi", *args]
    if ranks:
        cmd = [shutil.which("mpiexec") or "mpiexec", "-n", str(ranks), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with a byte-level BPE tokenizer (written by our GGUF writer)."""
    return write_cli_gguf(str(tmp_path_factory.mktemp("cli") / "tiny.gguf"))


def assert_clean_error(p, *words):
    """Non-zero exit, one `error:` line (from the root, whatever the rank count), no traceback."""
    assert p.returncode != 0
    assert p.stderr.count("error:") == 1 and "Traceback" not in p.stderr, p.stderr
    for w in words:
        assert w in p.stderr, p.stderr


def test_inference_json(tiny):
    from dllama_mpi.tokenizer import Tokenizer
    p = run("inference", "--model", tiny, "--prompt", "hello world", "--steps", "8",
            "--temperature", "0", "--weights-float-type", "f32", "--json", "--max-seq-len", "64")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    tok = Tokenizer.from_gguf(tiny)
    assert out["prompt_tokens"] == tok.encode("hello world")
    expected = our_greedy(SerialComm(), tiny, out["prompt_tokens"], 8, max_seq_len=64)
    stop = next((i for i, t in enumerate(expected) if t in tok.eos_ids), len(expected))
    assert out["generated_tokens"] == expected[:stop]
    assert out["text"] == tok.decode(out["generated_tokens"])
    for key in ("prompt_tokens_per_s", "decode_tokens_per_s", "finish_reason", "per_rank"):
        assert key in out
    assert set(out["per_rank"][0]) >= {"rank", "compute_ms", "sync_ms", "bytes_sent", "bytes_recv"}


GREEDY_F32 = ("--temperature", "0", "--weights-float-type", "f32", "--max-seq-len", "32")


def test_stdout_is_the_generated_text_alone(tiny):
    """stdout: the text, then a newline; the same text --json reports. Everything else (the
    stages, the memory and sampling lines, the summary) is on stderr."""
    p = run("inference", "--model", tiny, "--prompt", "abc", "--steps", "6", *GREEDY_F32)
    assert p.returncode == 0, p.stderr
    j = run("inference", "--model", tiny, "--prompt", "abc", "--steps", "6", *GREEDY_F32, "--json")
    out = json.loads(j.stdout)
    assert p.stdout == out["text"] + "\n"
    n = len(out["prompt_tokens"])
    for line in ("dllama_mpi: 1 rank x", "model: ", "loading ", "loaded in", f"generating: {n} "
                 "prompt tokens, up to 6 new; greedy", f"prompt: {n} tokens", "decode: "):
        assert line in p.stderr, (line, p.stderr)


def test_echo_prints_the_prompt_then_the_text(tiny):
    p = run("inference", "--model", tiny, "--prompt", "abc", "--steps", "6", *GREEDY_F32, "--echo")
    j = run("inference", "--model", tiny, "--prompt", "abc", "--steps", "6", *GREEDY_F32, "--json")
    assert p.returncode == 0, p.stderr
    assert p.stdout == "abc" + json.loads(j.stdout)["text"] + "\n"


def test_stage_lines_in_order_and_from_the_root_only(tiny):
    """Under mpiexec stderr is a pipe: plain stage lines, in order, once (from rank 0)."""
    p = run("inference", "--model", tiny, "--prompt", "abc", "--steps", "2", *GREEDY_F32, ranks=2)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    order = ["dllama_mpi: 2 ranks x", "model: ", "loading ", "loaded in", "rank 0: weights",
             "generating: ", "prompt: ", "decode: "]
    at = [next(i for i, line in enumerate(lines) if line.startswith(o)) for o in order]
    assert at == sorted(at), p.stderr
    assert sum(line.startswith("dllama_mpi:") for line in lines) == 1
    assert sum(line.startswith("loading ") for line in lines) == 1
    assert "\r" not in p.stderr           # no terminal bar when stderr is not a terminal


def test_quiet_prints_nothing_but_the_text(tiny):
    p = run("inference", "--model", tiny, "--prompt", "abc", "--steps", "3", *GREEDY_F32, "--quiet")
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert p.stdout.endswith("\n")


def test_stats_lines_are_whole_lines_and_name_the_prompt_pass(tiny):
    p = run("inference", "--model", tiny, "--prompt", "abc", "--steps", "4", *GREEDY_F32,
            "--stats", "--ignore-eos")
    assert p.returncode == 0, p.stderr
    stats = [line for line in p.stderr.splitlines() if line.startswith("[")]
    assert "" not in p.stderr.splitlines()          # no blank lines
    tail = r"\] compute \d+\.\d\d ms, sync \d+\.\d\d ms, sent \d+\.\d kB, recv \d+\.\d kB"
    n = re.search(r"generating: (\d+) prompt tokens", p.stderr).group(1)
    assert re.fullmatch(r"\[prompt pass: " + n + " tokens" + tail, stats[0]), stats[0]
    assert [re.fullmatch(r"\[token (\d+)" + tail, s).group(1) for s in stats[1:]] == ["2", "3", "4"]


def test_steps_0_prints_no_text_and_no_decode_speed(tiny):
    p = run("inference", "--model", tiny, "--prompt", "abc", "--steps", "0", *GREEDY_F32)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "\n"
    assert re.search(r"^prompt: \d+ tokens, not run \(--steps 0\)$", p.stderr, re.M), p.stderr
    assert "tok/s" not in p.stderr and "decode:" not in p.stderr
    assert "per token" not in p.stderr


@pytest.fixture(scope="module")
def unk_model(tmp_path_factory):
    """A tiny model whose every logit is 0: greedy decoding picks id 0, <unk>, a control
    token, at every step (--ignore-eos or not: the EOS id 2 never wins)."""
    from dllama_mpi.testing import random_llama_tensors, write_llama_gguf
    path = str(tmp_path_factory.mktemp("unk") / "unk.gguf")
    shape = dict(dim=96, hidden_dim=160, n_layers=2, n_heads=3, n_kv_heads=1, vocab_size=400)
    tensors = dict(random_llama_tensors(**shape, std=0.1, seed=3))
    tensors["lm_head.weight"] = np.zeros_like(tensors["lm_head.weight"])
    write_llama_gguf(path, **shape, context_length=128, weight_type="f32", tokenizer="bytes",
                     tensors=tensors)
    return path


def test_special_tokens_are_not_printed_as_text(unk_model):
    p = run("inference", "--model", unk_model, "--prompt", "abc", "--steps", "5", *GREEDY_F32,
            "--ignore-eos")
    assert p.returncode == 0, p.stderr
    assert p.stdout == "\n" and "decode: 5 tokens" in p.stderr
    j = run("inference", "--model", unk_model, "--prompt", "abc", "--steps", "5", *GREEDY_F32,
            "--ignore-eos", "--json")
    out = json.loads(j.stdout)
    assert out["generated_tokens"] == [0] * 5 and out["text"] == ""


def test_chat_prints_the_answer_not_the_template(tiny):
    """--chat: stdout is the answer (no template, no prompt); --echo puts the message and a
    newline before it. The model sees the template (more prompt tokens)."""
    p = run("inference", "--model", tiny, "--prompt", "hello", "--steps", "4", *GREEDY_F32,
            "--chat", "--json")
    out = json.loads(p.stdout)
    assert len(out["prompt_tokens"]) > len("hello") + 1
    q = run("inference", "--model", tiny, "--prompt", "hello", "--steps", "4", *GREEDY_F32, "--chat")
    assert q.stdout == out["text"] + "\n"
    assert "im_start" not in q.stdout and "hello" not in q.stdout[:5]
    e = run("inference", "--model", tiny, "--prompt", "hello", "--steps", "4", *GREEDY_F32,
            "--chat", "--echo")
    assert e.stdout == "hello\n" + out["text"] + "\n"


def test_random_seed_is_said_and_repeats_the_text(tiny):
    import re
    p = run("inference", "--model", tiny, "--prompt", "abc", "--steps", "8",
            "--weights-float-type", "f32", "--max-seq-len", "32", "--ignore-eos")
    seed = re.search(r"--seed (\d+) repeats this text", p.stderr).group(1)
    q = run("inference", "--model", tiny, "--prompt", "abc", "--steps", "8",
            "--weights-float-type", "f32", "--max-seq-len", "32", "--ignore-eos", "--seed", seed)
    assert p.stdout == q.stdout and "(random" not in q.stderr


def test_two_ranks_report_bytes(tiny):
    p = run("inference", "--model", tiny, "--prompt", "abc", "--steps", "4", "--temperature", "0",
            "--weights-float-type", "f32", "--max-seq-len", "32", "--json", ranks=2)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["n_ranks"] == 2 and len(out["per_rank"]) == 2
    # per decode token: 2 layers x 2 all-gathers of dim f32 to one peer, plus the step
    assert out["per_rank"][1]["bytes_sent"] >= 2 * 2 * 96 * 4


@pytest.mark.parametrize("ranks", [None, 2, 3])  # one process, and under mpiexec
def test_missing_file(ranks):
    assert_clean_error(run("inference", "--model", "/nonexistent.gguf", "--prompt", "x",
                           ranks=ranks), "not found")


@pytest.mark.parametrize("ranks", [None, 2, 3])  # one process, and under mpiexec
def test_not_a_gguf(tmp_path, ranks):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a model" * 100)
    assert_clean_error(run("inference", "--model", str(bad), "--prompt", "x", ranks=ranks),
                       "unknown model format")


@pytest.mark.parametrize("ranks", [None, 2, 3])  # one process, and under mpiexec
def test_truncated_file(tiny, tmp_path, ranks):
    cut = tmp_path / "cut.gguf"
    data = open(tiny, "rb").read()
    cut.write_bytes(data[: len(data) * 2 // 3])
    assert_clean_error(run("inference", "--model", str(cut), "--prompt", "x", ranks=ranks),
                       "truncated")


def test_prompt_longer_than_context(tiny):
    p = run("inference", "--model", tiny, "--prompt", "a long prompt " * 10,
            "--max-seq-len", "8", "--weights-float-type", "f32")
    assert_clean_error(p, "max-seq-len")
    assert "loading" not in p.stderr and p.stdout == ""     # found before loading anything


def test_chat_prompt_longer_than_context_counts_the_template(tiny):
    # "hi" is 3 tokens; with the chat template around it, more than 8
    p = run("inference", "--model", tiny, "--prompt", "hi", "--max-seq-len", "8", "--chat",
            "--weights-float-type", "f32")
    assert_clean_error(p, "max-seq-len")
    assert "loading" not in p.stderr


@pytest.mark.parametrize("env,value", [({}, "999"), ({"NUMBA_NUM_THREADS": "1"}, "2")])
def test_nthreads_beyond_numba_is_one_error(env, value):
    p = run("inference", "--model", "x.gguf", "--prompt", "x", "--nthreads", value,
            env={**os.environ, **env})
    assert_clean_error(p, f"--nthreads {value}", "NUMBA_NUM_THREADS")
    assert p.returncode == 2


def test_prompt_too_long_on_two_ranks_exits_everywhere(tiny):
    p = run("inference", "--model", tiny, "--prompt", "a long prompt " * 10,
            "--max-seq-len", "8", "--weights-float-type", "f32", ranks=2)
    assert_clean_error(p, "max-seq-len")


def test_more_ranks_than_heads_is_one_clear_error(tiny):
    p = run("inference", "--model", tiny, "--prompt", "x", ranks=4)  # 3 query heads
    assert_clean_error(p, "at most 3 ranks")
    assert p.stderr.count("error:") == 1


def test_q40_on_a_model_that_cannot_take_it(tiny):
    # head_dim 32 with 3 heads on 2 ranks is fine; dim 96 works; hidden 160 splits 96/64: ok.
    # The 400-token vocabulary is fine too, so Q40 must run here.
    p = run("inference", "--model", tiny, "--prompt", "x", "--steps", "2", "--max-seq-len", "16",
            ranks=2)
    assert p.returncode == 0, p.stderr


def test_config_preset_and_override(tiny, tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text(f'model = "{tiny}"\ntemperature = 0.0\nsteps = 3\nmax-seq-len = 32\n'
                      f'weights-float-type = "f32"\n')
    p = run("inference", "--config", str(preset), "--prompt", "abc", "--json", "--steps", "2")
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout)["generated_tokens"]) <= 2  # the command line wins


def test_config_with_unknown_key(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('model = "x.gguf"\ntemprature = 0.5\n')
    assert_clean_error(run("inference", "--config", str(preset), "--prompt", "x"), "temprature")


# ------------------------------------------------------------------------------ info

INFO_SHAPE = "qwen3_gqa6"  # q_dim 192 != dim 96, q/k norms: the count is not just dim²·L


@pytest.fixture(scope="module")
def every_format(tmp_path_factory):
    """The same random tiny model as an HF folder, a GGUF (with a tokenizer), a .m + .t
    converted from the GGUF, and an .h5 converted from the folder."""
    from dllama_mpi.apps.convert import convert
    from dllama_mpi.testing import write_llama_gguf
    from tiny import ARCH_SHAPES, hf_arch_model, save_hf_arch
    d = tmp_path_factory.mktemp("info")
    s = ARCH_SHAPES[INFO_SHAPE]
    hf = save_hf_arch(str(d / "hf"), INFO_SHAPE)
    gguf = str(d / "m.gguf")
    tensors = {k: v.detach().float().numpy() for k, v in hf_arch_model(INFO_SHAPE).state_dict().items()}
    write_llama_gguf(gguf, arch=s["arch"], dim=s["dim"], hidden_dim=s["hidden_dim"],
                     n_layers=s["n_layers"], n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"],
                     vocab_size=s["vocab_size"], context_length=256, head_dim=s["head_dim"],
                     rope_theta=1000000.0, norm_eps=1e-6, tensors=tensors, weight_type="f32",
                     tokenizer="bytes")
    m, t = convert(gguf, str(d / "m.m"), "f32", to="dllama", progress=False)
    assert t.endswith(".t")
    h5 = convert(hf, str(d / "m.h5"), "f32", progress=False)[0]
    return {"gguf": gguf, "m": m, "hf": hf, "h5": h5}


def _parse_info(text: str):
    config, ranks, params = {}, [], None
    for line in text.splitlines():
        if line.startswith("  "):
            k, _, v = line.strip().partition(": ")
            config[k] = v
        elif line.startswith("tensors:"):
            params = int(line.split("parameters: ")[1].split()[0].replace(",", ""))
        elif line.startswith("rank "):
            ranks.append(line)
    return config, params, ranks


@pytest.mark.parametrize("form", ["gguf", "m", "hf", "h5"])
def test_info_for_every_format(every_format, form):
    """`info -n 3` prints the model's config, its exact parameter count and each rank's
    heads / KV heads / FFN / vocabulary bands (shard.plan)."""
    from dllama_mpi.config import ModelConfig
    from dllama_mpi.shard import plan
    from tiny import ARCH_SHAPES, hf_arch_model
    p = run("info", "--model", every_format[form], "-n", "3")
    assert p.returncode == 0, p.stderr
    config, params, ranks = _parse_info(p.stdout)
    s = ARCH_SHAPES[INFO_SHAPE]
    for key in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                "head_dim"):
        assert int(config[key]) == s[key], (key, p.stdout)
    assert config["arch"] == "qwen3" and config["qk_norm"] == "True"
    assert config["tied_embeddings"] == "False" and int(config["context_length"]) == 256
    assert float(config["rope_theta"]) == 1e6 and float(config["norm_eps"]) == pytest.approx(1e-6)
    assert params == sum(p.numel() for p in hf_arch_model(INFO_SHAPE).parameters())
    c = ModelConfig(**{k: s[k] for k in ("dim", "hidden_dim", "n_layers", "n_heads",
                                         "n_kv_heads", "vocab_size", "head_dim")},
                    arch="qwen3", context_length=256, qk_norm=True)
    assert len(ranks) == 3
    for r, line in enumerate(ranks):
        pl = plan(c, r, 3)
        assert line.startswith(
            f"rank {r}/3: heads {pl.q_heads.start}-{pl.q_heads.stop - 1}, "
            f"kv heads {pl.kv_heads.start}-{pl.kv_heads.stop - 1}, "
            f"ffn {pl.ffn.start}:{pl.ffn.stop}, vocab {pl.vocab.start}:{pl.vocab.stop};"), line


def _descendants(root_pid: int) -> set[int]:
    """root_pid's children, their children, and so on (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root_pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _rank_pids(root_pid: int, rank: int) -> list[int]:
    """PIDs of processes under root_pid (and only those: other runs on the machine are not
    ours to kill) whose MPI rank (PMI_RANK) is `rank`."""
    found = []
    for pid in sorted(_descendants(root_pid)):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if env.get(b"PMI_RANK") == str(rank).encode() and b"dllama_mpi" in cmd:
            found.append(pid)
    return found


def test_a_rank_that_dies_ends_the_job(tmp_path):
    """Kill rank 1 mid-generation: the job must end (non-zero), not hang in a collective."""
    import signal
    import time

    from dllama_mpi.testing import random_llama_tensors, write_llama_gguf
    path = str(tmp_path / "long.gguf")
    shape = dict(dim=96, hidden_dim=160, n_layers=2, n_heads=3, n_kv_heads=1, vocab_size=400)
    write_llama_gguf(path, **shape, context_length=16384, weight_type="f32", tokenizer="bytes",
                     tensors=random_llama_tensors(**shape, std=0.1, seed=3))
    cmd = [shutil.which("mpiexec") or "mpiexec", "-n", "2", sys.executable, "-m", "dllama_mpi",
           "inference", "--model", path, "--prompt", "abc", "--steps", "100000", "--ignore-eos",
           "--temperature", "0", "--weights-float-type", "f32", "--max-seq-len", "16384"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        pids = []
        while not pids and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            pids = _rank_pids(proc.pid, 1)
        assert pids, "rank 1 never started"
        time.sleep(3)  # let it load and start generating
        assert proc.poll() is None, "the job ended before the test could kill a rank"
        os.kill(pids[0], signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            pytest.fail("the job hung after a rank died")
    assert proc.returncode != 0


@pytest.mark.parametrize("ranks", [None, 2, 3])  # one process, and under mpiexec
def test_unsupported_architecture(tmp_path, ranks):
    path = write_header_only_gguf(tmp_path / "f.gguf", "falcon")
    assert_clean_error(run("inference", "--model", path, "--prompt", "x", ranks=ranks),
                       "unsupported architecture 'falcon'")


@pytest.mark.parametrize("ranks", [None, 2, 3])  # one process, and under mpiexec
def test_unsupported_tensor_type(tmp_path, ranks):
    path = write_header_only_gguf(tmp_path / "q.gguf", "llama", tensor_type="IQ4_NL")
    assert_clean_error(run("inference", "--model", path, "--prompt", "x", ranks=ranks), "IQ4_NL")


# ------------------------------------------------------------------ SmolLM2: the quick start

@pytest.mark.slow
def test_quick_start_on_two_ranks_answers_paris():
    """README command 1 (greedy, fewer steps): the text alone on stdout."""
    from tiny import smollm2_path
    smollm2_path()                  # in the cache (the suite's other SmolLM2 tests need it too)
    p = run("inference", "--model", "smollm2-135m", "--prompt", "The capital of France is",
            "--steps", "4", "--temperature", "0", ranks=2)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(" Paris") and "The capital" not in p.stdout
    assert p.stderr.startswith("dllama_mpi: 2 ranks x ")


@pytest.mark.slow
def test_chat_past_the_end_of_turn_prints_no_special_tokens():
    """--chat --ignore-eos used to print `<|im_end|>` and `<|im_start|>` as text."""
    from tiny import smollm2_path
    p = run("inference", "--model", smollm2_path(), "--prompt", "Say hi", "--chat",
            "--ignore-eos", "--steps", "40", "--temperature", "0", "--json")
    out = json.loads(p.stdout)
    from dllama_mpi.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(smollm2_path())
    ends = {tok.token_to_id("<|im_end|>"), tok.token_to_id("<|im_start|>")}
    assert ends & set(out["generated_tokens"]), "the model did not pass an end of turn"
    assert "<|im_" not in out["text"]
    q = run("inference", "--model", smollm2_path(), "--prompt", "Say hi", "--chat",
            "--ignore-eos", "--steps", "40", "--temperature", "0")
    assert q.stdout == out["text"] + "\n" and "<|im_" not in q.stdout
