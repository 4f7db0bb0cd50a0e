"""The capacity planner (`plan`, predict.py): presets against the published sizes, its
arithmetic against values computed by hand, its memory against memory.py and start-up's own
report, its bytes per token against what comm.py counts in real 1- and 2-rank runs, sane
predictions, the smallest rank count that fits, and clean command-line errors."""
import json
import math
import pathlib
import shutil
import subprocess
import sys

import pytest

from dllama_mpi import memory, predict
from dllama_mpi.comm import SerialComm
from dllama_mpi.config import RunConfig
from dllama_mpi.predict import LINKS, PRESETS, Machine, make_plan, n_params

TIMEOUT = 300
GiB = 2**30


def run_cli(*args, ranks=None):
    cmd = [sys.executable, "-m", "dllama_mpi", *args]
    if ranks:
        cmd = [shutil.which("mpiexec") or "mpiexec", "-n", str(ranks), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)


def plan_json(*args) -> dict:
    p = run_cli("plan", *args, "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def preset_run(name, weights="q40", seq=0, parallel=1):
    file_type = predict.PRESET_FILE_TYPE[weights]
    return RunConfig(weights_float_type=weights, max_seq_len=seq,
                     parallel=parallel).resolved(weights, file_type)


# -- presets ------------------------------------------------------------------------------

# parameters of the published checkpoints (safetensors totals on the Hugging Face hub)
PUBLISHED = {"llama3.1-405b": 405_853_388_800, "llama3.1-70b": 70_553_706_496,
             "llama3.1-8b": 8_030_261_248, "llama3.2-3b": 3_212_749_824,
             "llama3.2-1b": 1_235_814_400, "qwen3-14b": 14_768_307_200,
             "smollm2-135m": 134_515_008}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_have_the_published_sizes(name):
    assert n_params(PRESETS[name].config) == PUBLISHED[name]
    assert abs(n_params(PRESETS[name].config) / PRESETS[name].published_params - 1) < 0.01


def test_405b_preset_is_the_published_shape():
    c = PRESETS["llama3.1-405b"].config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size) == (
        16384, 53248, 126, 128, 8, 128256)
    assert c.head_dim == 128 and c.rope_theta == 500000.0 and not c.tied_embeddings
    f = c.rope_freq_factors      # llama3 scaling: high frequencies kept, low ones / 8
    assert len(f) == 64 and f[0] == 1.0 and f[-1] == 8.0


def test_preset_of_the_synthetic_model_is_what_make_synthetic_writes():
    import importlib.util
    import pathlib
    spec = importlib.util.spec_from_file_location(
        "make_synthetic", pathlib.Path(__file__).parents[1] / "bench" / "make_synthetic.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    p, c = mod.PRESETS["synthetic-1.1b"], PRESETS["synthetic-1.1b"].config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size) == tuple(
        p[k] for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size"))


# -- arithmetic by hand ------------------------------------------------------------------

def test_smollm2_on_two_ranks_by_hand():
    c = PRESETS["smollm2-135m"].config
    run = preset_run("smollm2-135m")
    p = make_plan(c, run, 2, LINKS["1gbe"], Machine(), predict.embedding_row_bytes(c.dim, "Q4_0"))
    # Q80 partial sum of 576 values: 576 int8 + 18 f16 scales = 612 bytes; 2 per layer, 30 layers
    reduce = 2 * 30 * 612
    row = 576 // 32 * 18                  # the token's Q4_0 embedding row: 324 bytes
    vocab = 49152 // 2                    # logit rows per rank (1536 blocks of 32, even)
    assert [(t.sent, t.recv) for t in p.traffic] == [
        (reduce + 16 + row, reduce + 4 * vocab), (reduce + 4 * vocab, reduce + 16 + row)]
    assert p.collectives == 2 * 30 + 3
    # rank 0: heads 0-4 (KV heads 0-1), FFN 768, vocab 24576, all Q40 with < 2048 columns:
    # row tiles of 16 rows x 18 bytes per block
    def q40(rows, cols):
        return -(-rows // 16) * 16 * cols // 32 * 18
    layer = (q40(5 * 64 + 2 * 2 * 64, 576) + q40(576, 5 * 64) + q40(2 * 768, 576)
             + q40(576, 768) + 2 * 576 * 4)
    assert p.memory[0].weights == 30 * layer + 576 * 4 + q40(24576, 576)
    assert p.memory[0].kv_cache == 2 * 4 * 30 * 4096 * 2 * 64


def test_405b_on_eight_ranks_by_hand():
    c = PRESETS["llama3.1-405b"].config
    p = make_plan(c, preset_run("llama3.1-405b"), 8, LINKS["10gbe"], Machine(),
                  predict.embedding_row_bytes(c.dim, "Q4_0"))
    # 16 query heads and 1 KV head per rank, FFN 6656; > 2047 columns: 18 bytes per block
    layer = (2048 + 2 * 128) * 512 * 18 + 16384 * 64 * 18 + 2 * 6656 * 512 * 18 \
        + 16384 * 208 * 18 + 2 * 16384 * 4
    vocab = 128256 // 32 // 8 * 32        # 501 blocks of 32 rows
    weights = 126 * layer + 16384 * 4 + vocab * 512 * 18
    assert weights == 28_405_104_640 and p.memory[0].weights == weights
    assert p.memory[0].kv_cache == 2 * 4 * 126 * 4096 * 1 * 128
    reduce = 2 * 126 * (16384 + 1024) * 7
    assert (p.traffic[0].sent, p.traffic[0].recv) == (reduce + 7 * (16 + 9216),
                                                      reduce + 4 * (128256 - vocab))
    assert p.collectives == 255
    # network on 10GbE: 252 all-gathers of 8 x 17408 bytes (< 512 KiB, 8 a power of two:
    # recursive doubling, 3 latencies + 7 blocks), 2 binomial broadcasts, 1 gather
    link = LINKS["10gbe"]
    a, b = link.latency, 1 / link.bandwidth
    net = (252 * (3 * a + 7 * 17408 * b) + 3 * (a + 16 * b) + 3 * (a + 9216 * b)
           + a + 4 * 128256 * 7 / 8 * b)
    assert p.decode.network_s == pytest.approx(net, rel=1e-12)


# -- memory: memory.py and start-up's report ---------------------------------------------------

@pytest.mark.parametrize("name", ["llama3.1-70b", "qwen3-14b", "smollm2-135m"])
@pytest.mark.parametrize("size", [1, 3, 8])
def test_per_rank_bytes_are_memory_per_rank(name, size):
    c = PRESETS[name].config
    if size > c.n_heads:
        return
    run = preset_run(name, seq=2048, parallel=4)
    p = make_plan(c, run, size, LINKS["1gbe"], Machine(), 100)
    assert p.memory == memory.per_rank(c, run, size)
    assert p.rank_bytes == [m.total + predict.RUNTIME_BYTES for m in p.memory]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama (Q4_0 matrices, a byte-level BPE tokenizer)."""
    from dllama_mpi.testing import random_llama_tensors, write_llama_gguf
    path = str(tmp_path_factory.mktemp("plan") / "tiny.gguf")
    shape = dict(dim=288, hidden_dim=416, n_layers=2, n_heads=9, n_kv_heads=3, vocab_size=320)
    write_llama_gguf(path, **shape, context_length=128, head_dim=32, weight_type="q4_0",
                     tokenizer="bytes", tensors=random_llama_tensors(**shape, std=0.1, seed=3))
    return path


@pytest.mark.parametrize("weights", ["auto", "q41", "f32"])
def test_plan_of_a_model_equals_start_up_report(tiny, weights):
    from dllama_mpi.runtime.startup import start
    s = start(SerialComm(), tiny, RunConfig(weights_float_type=weights, max_seq_len=40,
                                             nthreads=1, parallel=3), want_tokenizer=False)
    out = plan_json("--model", tiny, "-n", "1", "--weights-float-type", weights,
                    "--max-seq-len", "40", "--max-batch", "3")
    held = s.memory[0]
    r = out["per_rank"][0]
    assert (r["weights"], r["kv_cache"], r["buffers"]) == (held.weights, held.kv_cache,
                                                          held.buffers)
    assert out["weights_float_type"] == s.run.weights_float_type
    assert out["buffer_float_type"] == s.run.buffer_float_type


@pytest.mark.parametrize("kind", ["q4_k_m", "moe"])
def test_plan_of_mixed_and_moe_files_equals_start_up_report(tmp_path, kind):
    """A Q4_K_M file (each matrix its own runtime type) and a mixture of experts: the plan
    holds what start-up reports; a MoE decode step streams the chosen experts only."""
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from tiny import write_moe_gguf, write_tiny_gguf
    from dllama_mpi.runtime.startup import start
    path = str(tmp_path / f"{kind}.gguf")
    if kind == "moe":
        write_moe_gguf(path, "mixtral", "q4_0")
    else:
        write_tiny_gguf(path, "k8h", "q4_k_m")
    s = start(SerialComm(), path, RunConfig(max_seq_len=40, nthreads=1), want_tokenizer=False)
    out = plan_json("--model", path, "-n", "1", "--max-seq-len", "40")
    r, held = out["per_rank"][0], s.memory[0]
    assert (r["weights"], r["kv_cache"], r["buffers"]) == (held.weights, held.kv_cache,
                                                          held.buffers)
    assert out["weights_float_type"] == s.run.weights_float_type
    from dllama_mpi.formats import expected_shapes, open_model
    m = open_model(path)
    try:
        assert out["parameters"] == sum(math.prod(m.tensor(n).shape)
                                        for n in expected_shapes(m.config))
    finally:
        m.close()
    assert s.run.weights_float_type == ("q40" if kind == "moe" else "mixed")
    # the decode step streams what memory.read_bytes counts: for a MoE, less than it holds
    step = out["decode"]["compute_ms"] - out["decode"]["fixed_ms"]
    streamed = step / 1e3 * out["stream_bytes_s"]
    read = memory.read_bytes(s.config, predict.plan(s.config, 0, 1), s.run)
    assert streamed == pytest.approx(read + predict.kv_read_bytes(
        s.config, 0, 1, out["context"], s.run.kv_cache_float_type), rel=1e-6)
    assert (read < held.weights) == (kind == "moe")


# -- bytes per token against comm.py's counts ---------------------------------------------------

@pytest.mark.parametrize("ranks,wire", [(1, "auto"), (2, "q80"), (2, "f32")])
def test_bytes_per_token_equal_a_real_run(tiny, ranks, wire):
    p = run_cli("inference", "--model", tiny, "--prompt", "hello", "--steps", "6",
                "--temperature", "0", "--ignore-eos", "--max-seq-len", "32", "--json",
                "--buffer-float-type", wire, "--nthreads", "1", ranks=ranks if ranks > 1 else None)
    assert p.returncode == 0, p.stderr
    measured = [(r["bytes_sent"], r["bytes_recv"]) for r in json.loads(p.stdout)["per_rank"]]
    out = plan_json("--model", tiny, "-n", str(ranks), "--buffer-float-type", wire,
                    "--max-seq-len", "32")
    assert [(r["bytes_sent"], r["bytes_recv"]) for r in out["per_rank"]] == measured


# -- sane predictions ---------------------------------------------------------------------

def _plan(name="llama3.1-70b", n=4, link="10gbe", **machine):
    c = PRESETS[name].config
    return make_plan(c, preset_run(name), n, predict.parse_link(link), Machine(**machine),
                     predict.embedding_row_bytes(c.dim, "Q4_0"))


def test_predictions_are_monotonic_and_under_the_roofline():
    c = PRESETS["llama3.1-70b"].config
    sizes = [n for n in range(1, 17) if predict.is_valid_size(c, "q40", n)]
    weights = [max(m.weights for m in _plan(n=n).memory) for n in sizes]
    assert weights == sorted(weights, reverse=True)
    for n in sizes:
        p = _plan(n=n)
        roof = Machine().read_bw / max(m.weights for m in p.memory)
        assert 0 < p.decode.tok_s < roof
        assert p.prefill.tok_s > p.decode.tok_s           # a prompt is a matrix
        assert (p.decode.network_s == 0) == (n == 1)
    links = ["1gbe", "10gbe", "25gbe", "ib-hdr"]          # faster links, faster tokens
    speeds = [_plan(n=8, link=k).decode.tok_s for k in links]
    assert speeds == sorted(speeds)
    assert _plan(n=8, link="bw=1gbit,lat=1ms").decode.tok_s < _plan(
        n=8, link="bw=1gbit,lat=10us").decode.tok_s
    assert _plan(n=8, read_bw=40e9).decode.tok_s > _plan(n=8, read_bw=20e9).decode.tok_s
    # the Q80 wire sends 3.8x fewer bytes than F32
    c = PRESETS["llama3.1-70b"].config
    f32 = make_plan(c, RunConfig(weights_float_type="q40", buffer_float_type="f32")
                    .resolved("q40", "Q4_0"), 8, LINKS["1gbe"], Machine(), 4608)
    assert f32.traffic[1].sent > 3.5 * _plan(n=8).traffic[1].sent
    assert f32.decode.network_s > _plan(n=8, link="1gbe").decode.network_s


def test_links_parse():
    link = predict.parse_link("bw=2.5gbit,lat=80us")
    assert (link.bandwidth, link.latency) == pytest.approx((2.5e9 / 8, 80e-6))
    assert predict.parse_link("bw=1GB/s,lat=0.1ms").bandwidth == 1e9
    assert predict.parse_size("64GiB") == 64 * GiB and predict.parse_size("24 GB") == 24e9
    for bad in ("bw=1gbit", "lat=1us,bw=fast", "5gbe", "bw=1gbit,lat=1us,x=2", "bw=0gbit,lat=1us"):
        with pytest.raises(ValueError):
            predict.parse_link(bad)


def test_smallest_rank_count_that_fits():
    c = PRESETS["llama3.1-405b"].config
    run = preset_run("llama3.1-405b")

    def need(n):
        return max(m.total for m in memory.per_rank(c, run, n)) + predict.RUNTIME_BYTES

    for node in (24 * GiB, 64 * GiB, 128 * GiB, 256 * GiB):
        n = predict.smallest_fitting(c, run, Machine(memory=node), 128)
        assert n is not None and need(n) <= node and all(need(k) > node for k in range(1, n))
    assert predict.smallest_fitting(c, run, Machine(memory=GiB), 128) is None    # never
    assert predict.smallest_fitting(c, run, Machine(), 128) is None               # not asked
    # two ranks per node: the node holds both
    n2 = predict.smallest_fitting(c, run, Machine(memory=64 * GiB, ranks_per_node=2), 128)
    assert 2 * need(n2) <= 64 * GiB and 2 * need(n2 - 1) > 64 * GiB


# -- the command line ------------------------------------------------------------------------

def test_plan_cli_text_and_warning():
    p = run_cli("plan", "--preset", "llama3.1-405b", "-n", "8", "--link", "10gbe",
                "--node-memory", "24GiB")
    assert p.returncode == 0, p.stderr
    assert "rank 0: 26.45 GiB" in p.stdout and "255 collectives" in p.stdout
    assert "warning: does not fit" in p.stdout and "smallest rank count that fits is 10" in p.stdout


def test_plan_sweep_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "sweep.png"
    out = plan_json("--preset", "smollm2-135m", "--sweep", "--plot", str(png),
                    "--node-memory", "300MiB")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = out["sweep"]
    assert [r["ranks"] for r in rows] == list(range(1, 17))
    assert [r["valid"] for r in rows] == [n <= 9 for n in range(1, 17)]   # 9 heads
    assert set(rows[0]["decode_tok_s"]) == {"1gbe", "10gbe", "25gbe", "usb4", "ib-hdr"}


def assert_one_error(p, *words):
    assert p.returncode != 0
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("args,words", [
    (["--preset", "llama3.1-8b", "-n", "33"], ["33 ranks", "32 query heads"]),
    (["--preset", "llama3.1-8b"], ["-n"]),
    (["--preset", "nope", "-n", "2"], ["--preset"]),
    (["--preset", "llama3.1-8b", "-n", "2", "--link", "5gbe"], ["--link", "bw=RATE"]),
    (["--preset", "llama3.1-8b", "-n", "2", "--link", "bw=1gbit,lat=soon"], ["latency"]),
    (["--preset", "llama3.1-8b", "-n", "2", "--node-memory", "lots"], ["memory size"]),
    (["--preset", "llama3.1-8b", "-n", "0"], ["must be >= 1"]),
    (["--preset", "llama3.1-8b", "-n", "2", "--plot", "x.png"], ["--sweep"]),
    (["--preset", "llama3.1-8b", "--model", "x.gguf", "-n", "2"], ["not allowed"]),
    (["-n", "2"], ["--model", "--preset"]),
    (["--model", "/nonexistent.gguf", "-n", "2"], ["not found"]),
    (["--preset", "llama3.1-8b", "-n", "2", "--max-seq-len", "200000"], ["context"]),
])
def test_plan_cli_errors_are_one_line(args, words):
    assert_one_error(run_cli("plan", *args), *words)


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, tmp_path):
    from dllama_mpi.apps.plan import plot_sweep
    from dllama_mpi.errors import DllamaError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(DllamaError, match="needs matplotlib"):
        plot_sweep([], {}, "t", str(tmp_path / "x.png"))
