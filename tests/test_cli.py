"""The command line as a user runs it: output, JSON schema, and clean errors."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from dllama_mpi.comm import SerialComm
from tiny import our_greedy, write_header_only_gguf, write_tiny_gguf

TIMEOUT = 300


def run(*args, ranks=None, **kw):
    cmd = [sys.executable, "-m", "dllama_mpi", *args]
    if ranks:
        cmd = [shutil.which("mpiexec") or "mpiexec", "-n", str(ranks), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with a byte-level BPE tokenizer (written by our GGUF writer)."""
    from dllama_mpi.testing import random_llama_tensors, write_llama_gguf
    path = str(tmp_path_factory.mktemp("cli") / "tiny.gguf")
    shape = dict(dim=96, hidden_dim=160, n_layers=2, n_heads=3, n_kv_heads=1, vocab_size=400)
    write_llama_gguf(path, **shape, context_length=128, weight_type="f32", tokenizer="bytes",
                     tensors=random_llama_tensors(**shape, std=0.1, seed=3))
    return path


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


def test_inference_streams_text_then_summary(tiny):
    p = run("inference", "--model", tiny, "--prompt", "abc", "--steps", "4", "--temperature", "0",
            "--weights-float-type", "f32", "--max-seq-len", "32", "--stats")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("abc")
    assert "decode:" in p.stderr and "[token" in p.stderr


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
    assert_clean_error(run("inference", "--model", tiny, "--prompt", "a long prompt " * 10,
                           "--max-seq-len", "8", "--weights-float-type", "f32"), "max-seq-len")


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


def _descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(64):
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])   # ppid
        except (OSError, ValueError, IndexError):
            return False
        if pid <= 1:
            return False
    return False


def _rank_pids(root_pid: int, rank: int) -> list[int]:
    """PIDs of processes under root_pid whose MPI rank (PMI_RANK) is `rank` (never another
    job's: the machine may run others)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or not _descends_from(int(entry), root_pid):
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if env.get(b"PMI_RANK") == str(rank).encode() and b"dllama_mpi" in cmd:
            found.append(int(entry))
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
    path = write_header_only_gguf(tmp_path / "q.gguf", "llama", tensor_type="Q5_0")
    assert_clean_error(run("inference", "--model", path, "--prompt", "x", ranks=ranks), "Q5_0")
