"""The fault suite: the real program (`python -m dllama_mpi ...`, under `mpiexec -n 2` where
ranks matter) on bad inputs and faults. Each case runs as a subprocess under a timeout and is
checked for: its exit code; the one `error:` line it must print (exactly: no other error
line, from any rank), or none; no Python traceback; no file left behind (the case's working
folder and its $TMPDIR are compared before and after); and what the case itself adds
(output files complete or absent, the time a dead rank takes to end the job).

Used by test_faults.py (one test per case) and table.py (the Markdown table of every case
and its outcome, for the README's Reliability section). Models are tiny random Llamas
(tests/tiny.py's writer), made once per run by `build_fixtures`.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

TIMEOUT = 90            # seconds: a case still running then is a hang
MPIEXEC = shutil.which("mpiexec") or "mpiexec"
SHAPE = dict(dim=96, hidden_dim=160, n_layers=2, n_heads=3, n_kv_heads=1, vocab_size=400)


# ----------------------------------------------------------------------------- fixtures

def _gguf(path: str, context: int = 128, seed: int = 3, **shape) -> str:
    from dllama_mpi.testing import random_llama_tensors, write_llama_gguf
    s = dict(SHAPE, **shape)
    write_llama_gguf(path, **s, context_length=context, weight_type="f32", tokenizer="bytes",
                     tensors=random_llama_tensors(**s, std=0.1, seed=seed))
    return path


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def _tensor_info(data: bytes, name: str) -> tuple[int, int]:
    """Position of a GGUF tensor's n_dims field, and n_dims."""
    key = name.encode()
    i = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    return i, struct.unpack_from("<I", data, i)[0]


def _nan_tensor(path: str, data: bytes, name: str) -> bytes:
    """The file with an F32 tensor's values all NaN."""
    from dllama_mpi.formats.gguf_header import GGUFHeader
    for tname, ttype, dims, offset, nbytes in GGUFHeader(path).tensors:
        if tname == name:
            assert ttype == "F32"
            return data[:offset] + b"\xff\xff\xff\x7f" * (nbytes // 4) + data[offset + nbytes:]
    raise KeyError(name)


def _edit(data: bytes, fn) -> bytes:
    b = bytearray(data)
    fn(b)
    return bytes(b)


def _hf_folder(path: str, safetensors: bytes | None, config: str | None) -> str:
    os.makedirs(path, exist_ok=True)
    if safetensors is not None:
        _write(os.path.join(path, "model.safetensors"), safetensors)
    if config is not None:
        with open(os.path.join(path, "config.json"), "w") as f:
            f.write(config)
    return path


def _hf_tensors() -> bytes:
    import numpy as np
    from safetensors.numpy import save
    s, r = SHAPE, np.random.default_rng(0)
    hd = s["dim"] // s["n_heads"]
    shapes = {"model.embed_tokens.weight": (s["vocab_size"], s["dim"]),
              "model.norm.weight": (s["dim"],), "lm_head.weight": (s["vocab_size"], s["dim"])}
    for i in range(s["n_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (s["n_heads"] * hd, s["dim"]),
                       p + "self_attn.k_proj.weight": (s["n_kv_heads"] * hd, s["dim"]),
                       p + "self_attn.v_proj.weight": (s["n_kv_heads"] * hd, s["dim"]),
                       p + "self_attn.o_proj.weight": (s["dim"], s["n_heads"] * hd),
                       p + "mlp.gate_proj.weight": (s["hidden_dim"], s["dim"]),
                       p + "mlp.up_proj.weight": (s["hidden_dim"], s["dim"]),
                       p + "mlp.down_proj.weight": (s["dim"], s["hidden_dim"]),
                       p + "input_layernorm.weight": (s["dim"],),
                       p + "post_attention_layernorm.weight": (s["dim"],)})
    return save({k: (0.1 * r.standard_normal(v)).astype(np.float32) for k, v in shapes.items()})


HF_CONFIG = json.dumps({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": SHAPE["dim"], "intermediate_size": SHAPE["hidden_dim"],
    "num_hidden_layers": SHAPE["n_layers"], "num_attention_heads": SHAPE["n_heads"],
    "num_key_value_heads": SHAPE["n_kv_heads"], "vocab_size": SHAPE["vocab_size"],
    "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "torch_dtype": "float32"})


def build_fixtures(root: str) -> dict[str, str]:
    """Every model file the cases read (read-only for them), by name."""
    from dllama_mpi.apps.convert import convert
    d = os.path.join(root, "models")
    os.makedirs(d, exist_ok=True)
    j = lambda name: os.path.join(d, name)  # noqa: E731
    fx = {"models": d}
    fx["tiny"] = _gguf(j("tiny.gguf"))
    fx["long"] = _gguf(j("long.gguf"), context=1 << 30)        # runs that last; huge KV
    fx["one_head"] = _gguf(j("one-head.gguf"), dim=32, n_heads=1, n_kv_heads=1)
    fx["other"] = _gguf(j("other.gguf"), vocab_size=300, seed=4)
    fx["big"] = _gguf(j("big.gguf"), dim=768, hidden_dim=2048, n_layers=8, n_heads=12,
                      n_kv_heads=4, vocab_size=4000)            # to q40 in a second or more
    fx["m"], fx["t"] = convert(fx["tiny"], j("tiny.m"), "f32", to="dllama", progress=False)
    fx["h5"] = convert(fx["tiny"], j("tiny.h5"), "f32", progress=False)[0]
    os.makedirs(j("lonely"))
    fx["m_alone"] = shutil.copy(fx["m"], j("lonely/alone.m"))
    g = open(fx["tiny"], "rb").read()
    m = open(fx["m"], "rb").read()
    h = open(fx["h5"], "rb").read()
    rnd = random.Random(0)
    noise = bytes(rnd.getrandbits(8) for _ in range(8192))
    q, nd = _tensor_info(g, "blk.0.attn_q.weight")
    bad = {
        "gguf_empty.gguf": b"", "gguf_cut8.gguf": g[:8], "gguf_cut100.gguf": g[:100],
        "gguf_cut_tensors.gguf": g[:q + 8], "gguf_cut_data.gguf": g[:len(g) * 2 // 3],
        "gguf_cut1.gguf": g[:-1], "gguf_magic.gguf": b"GGUX" + g[4:],
        "gguf_version.gguf": g[:4] + struct.pack("<I", 99) + g[8:],
        "gguf_kv_count.gguf": g[:16] + struct.pack("<Q", 1 << 60) + g[24:],
        "gguf_random.gguf": noise, "gguf_random_magic.gguf": b"GGUF\x03\0\0\0" + noise,
        "gguf_dim_mismatch.gguf": _edit(g, lambda b: struct.pack_into("<Q", b, q + 4, 95)),
        "gguf_dim_overflow.gguf": _edit(g, lambda b: struct.pack_into("<QQ", b, q + 4,
                                                                     1 << 32, 1 << 32)),
        "gguf_ndims.gguf": _edit(g, lambda b: struct.pack_into("<I", b, q, 5)),
        "gguf_type.gguf": _edit(g, lambda b: struct.pack_into("<I", b, q + 4 + 8 * nd, 99)),
        "gguf_nan.gguf": _nan_tensor(fx["tiny"], g, "output_norm.weight"),
        "m_empty.m": b"", "m_cut_header.m": m[:20], "m_cut.m": m[:len(m) // 2],
        "m_random.m": struct.pack("<i", 0x1234) + noise,
        "h5_empty.h5": b"", "h5_cut.h5": h[:len(h) // 2], "h5_cut_header.h5": h[:300],
        "h5_random.h5": b"\x89HDF\r\n\x1a\n" + noise,
    }
    for name, data in bad.items():
        fx[name.split(".")[0]] = _write(j(name), data)
    from tiny import write_header_only_gguf
    fx["gguf_arch"] = write_header_only_gguf(j("falcon.gguf"), "falcon")
    st = _hf_tensors()
    fx["hf_no_config"] = _hf_folder(j("hf-no-config"), st, None)
    fx["hf_bad_config"] = _hf_folder(j("hf-bad-config"), st, "{not json")
    fx["hf_cut"] = _hf_folder(j("hf-cut"), st[:len(st) // 2], HF_CONFIG)
    fx["hf_random"] = _hf_folder(j("hf-random"), noise, HF_CONFIG)
    fx["other_t"] = convert(fx["other"], j("other.m"), "f32", to="dllama", progress=False)[1]
    return fx


# ----------------------------------------------------------------------------- cases

@dataclass
class Ctx:
    fx: dict[str, str]
    work: str          # the case's working folder (cwd); must hold only `outputs` afterwards
    tmp: str           # its $TMPDIR: must be empty afterwards
    logs: str          # stdout / stderr files
    proc: subprocess.Popen | None = None
    notes: dict = field(default_factory=dict)
    vars: dict = field(default_factory=dict)      # more {names} for the case's text (setup)

    def fmt(self, text: str) -> str:
        return text.format(**self.fx, work=self.work, tmp=self.tmp, **self.vars)

    def stderr(self) -> str:
        with open(os.path.join(self.logs, "stderr"), errors="replace") as f:
            return f.read()


@dataclass
class Case:
    id: str
    group: str
    what: str
    args: list[str]                 # after `python -m dllama_mpi`; formatted with Ctx.fmt
    code: int = 1
    error: str | None = None        # the one `error:` line ("re:" prefix: a regex)
    ranks: int = 1                  # > 1: under mpiexec -n ranks
    setup: Callable[[Ctx], None] | None = None
    during: Callable[[Ctx], None] | None = None     # while it runs (signals)
    verify: Callable[[Ctx, "Result"], list[str]] | None = None   # more checks -> problems
    outputs: tuple[str, ...] = ()   # files it may leave in its working folder
    env: dict = field(default_factory=dict)
    needs: str | None = None        # "unshare": mount namespaces (skipped elsewhere)
    skip: str | None = None         # known gap, with the reason


@dataclass
class Result:
    code: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool
    leftovers: list[str]
    problems: list[str]
    skipped: str | None = None
    summary: str = ""

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


GEN = ["--steps", "2", "--temperature", "0", "--nthreads", "1"]
RUN_LONG = ["--prompt", "abc", "--steps", "100000", "--ignore-eos", "--temperature", "0",
            "--max-seq-len", "16384", "--nthreads", "1"]


def infer(model: str, *extra: str, prompt: str | None = "hello") -> list[str]:
    args = ["inference", "--model", model]
    if prompt is not None:
        args += ["--prompt", prompt]
    return args + GEN + list(extra)


# -- helpers of the cases

def _wait_for(ctx: Ctx, pattern: str, seconds: float = 60) -> re.Match | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and ctx.proc.poll() is None:
        m = re.search(pattern, ctx.stderr())
        if m:
            return m
        time.sleep(0.1)
    return None


def _rank_pid(ctx: Ctx, rank: int) -> int | None:
    m = _wait_for(ctx, rf"rank {rank}: .*; pid (\d+) on ")
    return int(m.group(1)) if m else None


def _signal_job(sig: int, after: float = 1.0):
    """Send `sig` to the job (mpiexec, which forwards it to every rank; or the one process)
    once it generates."""
    def during(ctx: Ctx) -> None:
        if _wait_for(ctx, r"rank 0\b.*KV cache") is None:
            ctx.notes["problem"] = "the run never started generating"
            return
        time.sleep(after)
        ctx.notes["sent"] = time.monotonic()
        ctx.proc.send_signal(sig)
    return during


def _signal_rank(rank: int, sig: int, after: float = 1.0):
    def during(ctx: Ctx) -> None:
        pid = _rank_pid(ctx, rank)
        if pid is None:
            ctx.notes["problem"] = f"rank {rank} never reported its pid"
            return
        time.sleep(after)
        ctx.notes["pid"] = pid
        ctx.notes["sent"] = time.monotonic()
        os.kill(pid, sig)
    return during


def _ended_within(seconds: float):
    def verify(ctx: Ctx, r: Result) -> list[str]:
        if "problem" in ctx.notes:
            return [ctx.notes["problem"]]
        took = ctx.notes["ended"] - ctx.notes["sent"]
        ctx.notes["summary"] = f"job ended {took:.1f} s after the signal"
        return [] if took <= seconds else [f"the job took {took:.1f} s to end"]
    return verify


def _killed_rank_named(ctx: Ctx, r: Result) -> list[str]:
    problems = _ended_within(10)(ctx, r)
    pid = ctx.notes.get("pid")
    if pid is not None:
        if f"PID {pid}" not in r.stdout:          # MPICH's hydra names the process by pid
            problems.append("the launcher did not name the dead process")
        if not re.search(rf"^rank 1: .*; pid {pid} on ", r.stderr, re.M):
            problems.append("the start-up report does not map the pid to rank 1")
        ctx.notes["summary"] += f"; mpiexec: 'PID {pid}', start-up report: 'rank 1: …; pid {pid} on …'"
    return problems


def _same_tokens_as_memory(ctx: Ctx, r: Result) -> list[str]:
    ref = subprocess.run([sys.executable, "-m", "dllama_mpi"] + infer(
        ctx.fx["tiny"], "--json", "--steps", "12") , capture_output=True, text=True,
        timeout=TIMEOUT, env=_env(ctx, {}))
    ours = json.loads(r.stdout)["generated_tokens"]
    theirs = json.loads(ref.stdout)["generated_tokens"]
    ctx.notes["summary"] = f"{len(ours)} tokens, equal to the in-memory run"
    return [] if ours == theirs else [f"disk KV {ours} != memory KV {theirs}"]


def _stale_folder(ctx: Ctx) -> None:
    folder = os.path.join(ctx.tmp, "dllama-kv-slurm7.0-deadhost-123-abcdef")
    os.makedirs(folder)
    for name in ("rank0.k", "rank0.v"):
        _write(os.path.join(folder, name), b"\0" * 4096)
    old = time.time() - 7200
    for p in [os.path.join(folder, n) for n in os.listdir(folder)] + [folder]:
        os.utime(p, (old, old))


def _batch_input(n: int, text: str = "hello", **extra) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        with open(os.path.join(ctx.work, "in.jsonl"), "w") as f:
            for i in range(n):
                f.write(json.dumps({"id": i, "prompt": f"{text} {i}", **extra}) + "\n")
    return setup


def _raw_input(data: bytes) -> Callable[[Ctx], None]:
    return lambda ctx: _write(os.path.join(ctx.work, "in.jsonl"), data)


def _batch_records(ok: int, failed: int, partial: bool = False):
    """out.jsonl holds whole OpenAI Batch records, one per custom_id: `ok` answered (status
    200), `failed` error records (status 400 with an error object); with partial, at most
    those (a stopped job that a rerun completes)."""
    def verify(ctx: Ctx, r: Result) -> list[str]:
        path = os.path.join(ctx.work, "out.jsonl")
        if not os.path.exists(path):
            return [] if partial else ["no results file"]
        try:
            rows = [json.loads(line) for line in open(path, encoding="utf-8")]
        except ValueError as e:
            return [f"a torn or invalid record: {e}"]
        ids = [x["custom_id"] for x in rows]
        good = sum(x["response"]["status_code"] == 200 for x in rows)
        bad = [x for x in rows if x["response"]["status_code"] != 200]
        ctx.notes["summary"] = f"{good} answered, {len(bad)} error records"
        found = [] if len(ids) == len(set(ids)) else ["a custom_id twice"]
        if any(x["response"]["status_code"] != 400 or not x["error"] for x in bad):
            found.append("an error record without status 400 and an error object")
        if partial:
            return found + ([] if good <= ok and len(bad) <= failed else ["too many records"])
        return found + ([] if (good, len(bad)) == (ok, failed) else
                        [f"{good} answered and {len(bad)} errors, expected {ok} and {failed}"])
    return verify


def _no_output(name: str):
    def verify(ctx: Ctx, r: Result) -> list[str]:
        return [f"{name} exists"] if os.path.exists(os.path.join(ctx.work, name)) else []
    return verify


def _existing_output(ctx: Ctx) -> None:
    _write(os.path.join(ctx.work, "out.h5"), b"the old file")


def _unchanged_output(ctx: Ctx, r: Result) -> list[str]:
    with open(os.path.join(ctx.work, "out.h5"), "rb") as f:
        return [] if f.read() == b"the old file" else ["the existing file was changed"]


def _wait_tmp_then_term(ctx: Ctx) -> None:
    """SIGTERM once convert writes its temporary file."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and ctx.proc.poll() is None:
        tmp = [n for n in os.listdir(ctx.work) if ".tmp-" in n]
        if tmp:
            ctx.notes["sent"] = time.monotonic()
            ctx.proc.send_signal(signal.SIGTERM)
            ctx.notes["summary"] = f"signalled while {tmp[0]} was being written"
            return
        time.sleep(0.05)
    ctx.notes["problem"] = "convert never wrote its temporary file"


def _signalled(ctx: Ctx) -> list[str]:
    return [ctx.notes["problem"]] if "problem" in ctx.notes else []


def _converted(ctx: Ctx, r: Result) -> list[str]:
    import h5py
    with h5py.File(os.path.join(ctx.work, "out.h5")) as f:
        return [] if "tensors" in f else ["not an HDF5 store"]


def _busy_port(ctx: Ctx) -> None:
    """A port this process holds while the case runs."""
    import socket
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    ctx.notes["socket"] = sock
    ctx.vars["port"] = str(sock.getsockname()[1])


def _serving(ctx: Ctx) -> str | None:
    m = _wait_for(ctx, r"serving \S+ on (http://\S+/v1)")
    if m is None:
        ctx.notes["problem"] = "the server never started"
    return m.group(1) if m else None


def _serve_then(sig: int, request: bool = False, rank: int | None = None):
    """Once serving (and, with `request`, once a client's long stream is running), send
    `sig` to the job, or to one rank."""
    def during(ctx: Ctx) -> None:
        import threading
        import urllib.request
        url = _serving(ctx)
        if url is None:
            return
        if request:
            got = ctx.notes["stream"] = []

            def client():
                body = json.dumps({"model": "x", "prompt": "abc", "max_tokens": 10000,
                                   "stream": True, "ignore_eos": True}).encode()
                req = urllib.request.Request(url + "/completions", body,
                                             {"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=60) as r:
                        for line in r:
                            got.append(line)
                except Exception as e:      # noqa: BLE001 - the connection closed
                    got.append(repr(e).encode())
                got.append(b"<end>")
            ctx.notes["client"] = threading.Thread(target=client, daemon=True)
            ctx.notes["client"].start()
            deadline = time.monotonic() + 30
            while len(got) < 20 and time.monotonic() < deadline:
                time.sleep(0.05)
        target = ctx.proc.pid
        if rank is not None:
            target = _rank_pid(ctx, rank)
        ctx.notes["sent"] = time.monotonic()
        if rank is None:
            ctx.proc.send_signal(sig)
        else:
            ctx.notes["pid"] = target
            os.kill(target, sig)
    return during


def _stream_ended(ctx: Ctx, r: Result) -> list[str]:
    problems = _ended_within(10)(ctx, r)
    thread = ctx.notes.get("client")
    if thread is not None:
        thread.join(10)
        got = ctx.notes["stream"]
        if not got or got[-1] != b"<end>":
            problems.append("the client's stream did not end")
        ctx.notes["summary"] += f"; the client's stream ended after {len(got) - 1} lines"
    return problems


TERM, INT, KILL = signal.SIGTERM, signal.SIGINT, signal.SIGKILL
NUMBA_MAX = ("re:error: --nthreads 1000: at most \\d+ here \\(numba's NUMBA_NUM_THREADS; 0 picks "
             "the cores per rank\\) \\(see dllama_mpi --help\\)")


def cases() -> list[Case]:
    C = Case
    unknown = ("error: {%s}: unknown model format (not GGUF, Distributed Llama .m, HDF5 or a "
               "Hugging Face folder; first bytes %s)")
    out = [
        # ---------------------------------------------------------------- model files
        C("gguf-missing", "model file", "a GGUF that does not exist",
          infer("{models}/nope.gguf"), error="error: model not found: {models}/nope.gguf"),
        C("gguf-missing-2r", "model file", "a GGUF that does not exist, 2 ranks",
          infer("{models}/nope.gguf"), ranks=2,
          error="error: model not found: {models}/nope.gguf"),
        C("gguf-empty", "model file", "an empty .gguf", infer("{gguf_empty}"),
          error=unknown % ("gguf_empty", "b''")),
        C("gguf-cut-8", "model file", "a GGUF cut after 8 bytes", infer("{gguf_cut8}"),
          error="error: cannot read GGUF file {gguf_cut8}: header runs past the end of the "
          "file or is corrupt (unpack_from requires a buffer of at least 24 bytes for "
          "unpacking 16 bytes at offset 8 (actual buffer size is 8)) (truncated or corrupt?)"),
        C("gguf-cut-100", "model file", "a GGUF cut in its metadata", infer("{gguf_cut100}"),
          error="re:error: cannot read GGUF file {gguf_cut100}: header runs past the end of "
          "the file or is corrupt \\(.*\\) \\(truncated or corrupt\\?\\)"),
        C("gguf-cut-tensors", "model file", "a GGUF cut in its tensor table",
          infer("{gguf_cut_tensors}"),
          error="re:error: cannot read GGUF file {gguf_cut_tensors}: header runs past the end "
          "of the file or is corrupt \\(.*\\) \\(truncated or corrupt\\?\\)"),
        C("gguf-cut-data", "model file", "a GGUF cut at 2/3 of its tensor data",
          infer("{gguf_cut_data}"),
          error="re:error: {gguf_cut_data} is truncated: tensor \\S+ ends at byte \\d+, file "
          "has \\d+"),
        C("gguf-cut-data-2r", "model file", "a GGUF cut in its data, 2 ranks (direct load)",
          infer("{gguf_cut_data}", "--load", "direct"), ranks=2,
          error="re:error: {gguf_cut_data} is truncated: tensor \\S+ ends at byte \\d+, file "
          "has \\d+"),
        C("gguf-cut-1", "model file", "a GGUF missing its last byte", infer("{gguf_cut1}"),
          error="re:error: {gguf_cut1} is truncated: tensor output.weight ends at byte \\d+, "
          "file has \\d+"),
        C("gguf-magic", "model file", "a GGUF with a corrupt magic", infer("{gguf_magic}"),
          error=unknown % ("gguf_magic", "b'GGUX\\x03\\x00\\x00\\x00'")),
        C("gguf-version", "model file", "a GGUF header with version 99",
          infer("{gguf_version}"),
          error="error: cannot read GGUF file {gguf_version}: GGUF version 99 (only 2 and 3, "
          "little-endian) (truncated or corrupt?)"),
        C("gguf-kv-count", "model file", "a GGUF header claiming 2^60 metadata keys",
          infer("{gguf_kv_count}"),
          error="re:error: cannot read GGUF file {gguf_kv_count}: header runs past the end of "
          "the file or is corrupt \\(.*\\) \\(truncated or corrupt\\?\\)"),
        C("gguf-random", "model file", "8 KiB of random bytes named .gguf",
          infer("{gguf_random}"), error="re:error: {gguf_random}: unknown model format .*"),
        C("gguf-random-magic", "model file", "the GGUF magic and version 3, then random bytes",
          infer("{gguf_random_magic}"),
          error="re:error: cannot read GGUF file {gguf_random_magic}: .* \\(truncated or "
          "corrupt\\?\\)"),
        C("gguf-dims-mismatch", "model file", "a tensor dimension changed 96 -> 95",
          infer("{gguf_dim_mismatch}"),
          error="error: {gguf_dim_mismatch}: tensor blk.0.attn_q.weight has shape (96, 95), "
          "expected (96, 96)"),
        C("gguf-dims-overflow", "model file", "tensor dimensions 2^32 x 2^32",
          infer("{gguf_dim_overflow}"),
          error="error: cannot read GGUF file {gguf_dim_overflow}: tensor blk.0.attn_q.weight "
          "has dimensions [4294967296, 4294967296]: 73786976294838206464 bytes, more than the "
          "whole file (truncated or corrupt?)"),
        C("gguf-ndims", "model file", "a tensor with 5 dimensions", infer("{gguf_ndims}"),
          error="error: cannot read GGUF file {gguf_ndims}: tensor blk.0.attn_q.weight has 5 "
          "dimensions (truncated or corrupt?)"),
        C("gguf-tensor-type", "model file", "a tensor of unknown type 99",
          infer("{gguf_type}"),
          error="error: cannot read GGUF file {gguf_type}: tensor blk.0.attn_q.weight has "
          "unknown type 99 (truncated or corrupt?)"),
        C("gguf-nan-weights", "model file", "the final norm's weights all NaN",
          infer("{gguf_nan}"),
          error="error: the model produced NaN or infinite logits (step at position 0): its "
          "weights are corrupt, or its values overflow"),
        C("gguf-nan-weights-2r", "model file", "weights that decode to NaN, 2 ranks",
          infer("{gguf_nan}"), ranks=2,
          error="error: the model produced NaN or infinite logits (step at position 0): its "
          "weights are corrupt, or its values overflow"),
        C("gguf-arch", "model file", "an unsupported architecture (falcon)",
          infer("{gguf_arch}"),
          error="re:error: {gguf_arch}: unsupported architecture 'falcon' \\(supported: llama, "
          "qwen2, qwen3.*\\)"),
        C("m-empty", "model file", "an empty .m", infer("{m_empty}"),
          error="error: {m_empty}: too short for a Distributed Llama model (0 bytes)"),
        C("m-cut-header", "model file", "a .m cut in its header", infer("{m_cut_header}"),
          error="re:error: {m_cut_header}: bad header size \\d+ \\(file has 20 bytes\\)"),
        C("m-cut", "model file", "a .m cut in half", infer("{m_cut}"),
          error="re:error: {m_cut}: file has \\d+ bytes but the header describes \\d+ "
          "\\(truncated; wrong shape or weight type\\?\\)"),
        C("m-cut-2r", "model file", "a .m cut in half, 2 ranks", infer("{m_cut}"), ranks=2,
          error="re:error: {m_cut}: file has \\d+ bytes but the header describes \\d+ "
          "\\(truncated; wrong shape or weight type\\?\\)"),
        C("m-random", "model file", "random bytes named .m", infer("{m_random}"),
          error="error: {m_random}: not a Distributed Llama model (magic 0x1234, expected "
          "0xa00abcd)"),
        C("m-without-t", "model file", "a .m without its .t", infer("{m_alone}"),
          error="error: {m_alone}: no tokenizer (.t) found next to it; give --tokenizer"),
        C("tokenizer-mismatch", "model file", "a .t of 400 tokens for a model of 300",
          infer("{other}", "--tokenizer", "{t}"),
          error="error: the tokenizer of {t} has 400 tokens (special ids up to 2), the model "
          "300: they do not belong together"),
        C("h5-empty", "model file", "an empty .h5", infer("{h5_empty}"),
          error=unknown % ("h5_empty", "b''")),
        C("h5-cut", "model file", "an .h5 cut in half", infer("{h5_cut}"),
          error="re:error: cannot open HDF5 file {h5_cut}: .*truncated file.* \\(truncated or "
          "corrupt\\?\\)"),
        C("h5-cut-header", "model file", "an .h5 cut after 300 bytes", infer("{h5_cut_header}"),
          error="re:error: cannot open HDF5 file {h5_cut_header}: .* \\(truncated or "
          "corrupt\\?\\)"),
        C("h5-random", "model file", "the HDF5 signature, then random bytes",
          infer("{h5_random}"),
          error="re:error: cannot open HDF5 file {h5_random}: .* \\(truncated or corrupt\\?\\)"),
        C("hf-no-config", "model file", "a Hugging Face folder without config.json",
          infer("{hf_no_config}"),
          error="error: {hf_no_config} is a directory without config.json: not a Hugging "
          "Face model folder"),
        C("hf-bad-config", "model file", "a Hugging Face folder whose config.json is not JSON",
          infer("{hf_bad_config}"),
          error="error: cannot read {hf_bad_config}/config.json: Expecting property name "
          "enclosed in double quotes: line 1 column 2 (char 1)"),
        C("hf-cut", "model file", "a Hugging Face folder with a truncated safetensors",
          infer("{hf_cut}"),
          error="error: cannot read {hf_cut}/model.safetensors: Error while deserializing "
          "header: incomplete metadata, file not fully covered (truncated or corrupt?)"),
        C("hf-random", "model file", "a Hugging Face folder whose safetensors is random bytes",
          infer("{hf_random}"),
          error="re:error: cannot read {hf_random}/model.safetensors: Error while "
          "deserializing header: .* \\(truncated or corrupt\\?\\)"),
        C("too-many-ranks", "ranks", "2 ranks for a model of 1 query head",
          infer("{one_head}"), ranks=2,
          error="re:error: .*at most 1 ranks.*"),
        # ---------------------------------------------------------------- options
        C("nthreads-negative", "option", "--nthreads -1", infer("{tiny}", "--nthreads", "-1"),
          code=2, error="error: argument --nthreads: must be >= 0, got -1 (see dllama_mpi "
          "inference --help)"),
        C("nthreads-huge", "option", "--nthreads 1000", infer("{tiny}", "--nthreads", "1000"),
          code=2, error=NUMBA_MAX),
        C("nthreads-huge-2r", "option", "--nthreads 1000, 2 ranks",
          infer("{tiny}", "--nthreads", "1000"), ranks=2, code=2, error=NUMBA_MAX),
        C("steps-negative", "option", "--steps -5", infer("{tiny}", "--steps", "-5"), code=2,
          error="error: argument --steps: must be >= 0, got -5 (see dllama_mpi inference "
          "--help)"),
        C("steps-not-a-number", "option", "--steps ten", infer("{tiny}", "--steps", "ten"),
          code=2, error="error: argument --steps: invalid integer value: 'ten' (see dllama_mpi "
          "inference --help)"),
        C("max-seq-len-negative", "option", "--max-seq-len -1",
          infer("{tiny}", "--max-seq-len", "-1"), code=2,
          error="error: argument --max-seq-len: must be >= 0, got -1 (see dllama_mpi "
          "inference --help)"),
        C("max-seq-len-beyond-context", "option", "--max-seq-len 100000 (context 128)",
          infer("{tiny}", "--max-seq-len", "100000"),
          error="error: --max-seq-len 100000 exceeds the model's context length 128"),
        C("temperature-negative", "option", "--temperature -1",
          infer("{tiny}", "--temperature", "-1"), code=2,
          error="error: argument --temperature: must be a finite number >= 0, got -1 (see "
          "dllama_mpi inference --help)"),
        C("temperature-nan", "option", "--temperature nan",
          infer("{tiny}", "--temperature", "nan"), code=2,
          error="error: argument --temperature: must be a finite number >= 0, got nan (see "
          "dllama_mpi inference --help)"),
        C("topp-zero", "option", "--topp 0", infer("{tiny}", "--topp", "0"), code=2,
          error="error: argument --topp: must be in (0, 1], got 0 (see dllama_mpi inference "
          "--help)"),
        C("topp-above-1", "option", "--topp 1.5", infer("{tiny}", "--topp", "1.5"), code=2,
          error="error: argument --topp: must be in (0, 1], got 1.5 (see dllama_mpi inference "
          "--help)"),
        C("topk-negative", "option", "--topk -3", infer("{tiny}", "--topk", "-3"), code=2,
          error="error: argument --topk: must be >= 0, got -3 (see dllama_mpi inference "
          "--help)"),
        C("seed-negative", "option", "--seed -1 with sampling",
          infer("{tiny}", "--seed", "-1", "--temperature", "0.7"), code=2,
          error="error: argument --seed: must be in [0, 2**63), got -1 (see dllama_mpi "
          "inference --help)"),
        C("seed-huge", "option", "--seed 2^64", infer("{tiny}", "--seed", str(2 ** 64)),
          code=2, error=f"error: argument --seed: must be in [0, 2**63), got {2 ** 64} (see "
          "dllama_mpi inference --help)"),
        C("seed-huge-2r", "option", "--seed 2^64, 2 ranks: one line from rank 0",
          infer("{tiny}", "--seed", str(2 ** 64)), ranks=2,
          code=2, error=f"error: argument --seed: must be in [0, 2**63), got {2 ** 64} (see "
          "dllama_mpi inference --help)"),
        C("unknown-option", "option", "--temprature 0.5 (misspelt)",
          infer("{tiny}", "--temprature", "0.5"), code=2,
          error="error: unrecognized arguments: --temprature 0.5 (see dllama_mpi --help)"),
        # ---------------------------------------------------------------- prompts
        C("prompt-empty", "prompt", "an empty prompt: generates after BOS",
          infer("{tiny}", prompt=""), code=0),
        C("prompt-too-long", "prompt", "a prompt longer than the context",
          infer("{tiny}", "--max-seq-len", "8", prompt="a long prompt " * 10),
          error="error: the prompt has 72 tokens; --max-seq-len is 8 (it must leave room for "
          "at least one generated token)"),
        C("prompt-too-long-2r", "prompt", "a prompt longer than the context, 2 ranks",
          infer("{tiny}", "--max-seq-len", "8", prompt="a long prompt " * 10), ranks=2,
          error="error: the prompt has 72 tokens; --max-seq-len is 8 (it must leave room for "
          "at least one generated token)"),
        C("prompt-invalid-utf8", "prompt", "--prompt with the byte 0xff",
          infer("{tiny}", prompt=os.fsdecode(b"caf\xff")), code=2,
          error="error: --prompt is not valid UTF-8 text (see dllama_mpi --help)"),
        C("model-nul", "prompt", "a NUL in --model (from a --config preset)",
          ["inference", "--config", "preset.toml", "--prompt", "hello"] + GEN,
          setup=lambda ctx: _write(os.path.join(ctx.work, "preset.toml"),
                                   b'model = "tiny\\u0000.gguf"\n'),
          outputs=("preset.toml",), code=2,
          error="error: --model contains a NUL character (see dllama_mpi --help)"),
        C("batch-invalid-utf8", "prompt", "a prompts line with invalid UTF-8: its error "
          "record, the rest runs", ["batch", "--model", "{tiny}", "--input", "in.jsonl",
                                    "--output", "out.jsonl", "--quiet"] + GEN,
          setup=_raw_input(b'{"prompt": "caf\xff"}\n{"prompt": "ok"}\n'),
          outputs=("in.jsonl", "out.jsonl"), code=0, verify=_batch_records(1, 1)),
        C("batch-nul-raw", "prompt", "a prompts line with a raw NUL byte: its error record",
          ["batch", "--model", "{tiny}", "--input", "in.jsonl", "--output", "out.jsonl",
           "--quiet"] + GEN,
          setup=_raw_input(b'{"prompt": "a\x00b"}\n{"prompt": "ok"}\n'),
          outputs=("in.jsonl", "out.jsonl"), code=0, verify=_batch_records(1, 1)),
        C("batch-nul-escaped", "prompt", "a prompt with \\u0000: its error record",
          ["batch", "--model", "{tiny}", "--input", "in.jsonl", "--output", "out.jsonl",
           "--quiet"] + GEN,
          setup=_raw_input(b'{"prompt": "ok"}\n{"prompt": "a\\u0000b"}\n'),
          outputs=("in.jsonl", "out.jsonl"), code=0, verify=_batch_records(1, 1)),
        # ---------------------------------------------------------------- KV cache
        C("kv-dir-missing", "KV cache", "--kv-cache-dir that does not exist",
          infer("{tiny}", "--kv-cache-dir", "{work}/nope"),
          error="error: --kv-cache-dir {work}/nope does not exist (create it first)"),
        C("kv-dir-missing-2r", "KV cache", "--kv-cache-dir that does not exist, 2 ranks",
          infer("{tiny}", "--kv-cache-dir", "{work}/nope"), ranks=2,
          error="error: --kv-cache-dir {work}/nope does not exist (create it first)"),
        C("kv-dir-is-a-file", "KV cache", "--kv-cache-dir naming a file",
          infer("{tiny}", "--kv-cache-dir", "{tiny}"),
          error="error: --kv-cache-dir {tiny} is not a directory"),
        C("kv-dir-unwritable", "KV cache", "--kv-cache-dir on a read-only mount",
          ["unshare", "-m", "sh", "-c", "mount -o bind,ro {work}/ro {work}/ro && exec \"$@\"",
           "-", sys.executable, "-m", "dllama_mpi"]
          + infer("{tiny}", "--kv-cache-dir", "{work}/ro"),
          setup=lambda ctx: os.makedirs(os.path.join(ctx.work, "ro")), outputs=("ro",),
          needs="unshare", error="error: --kv-cache-dir {work}/ro is not writable"),
        C("kv-dir-too-small", "KV cache", "--kv-cache-dir on a 32 KiB filesystem",
          ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=32k tmpfs {work}/small && "
           "exec \"$@\"", "-", sys.executable, "-m", "dllama_mpi"]
          + infer("{tiny}", "--kv-cache-dir", "{work}/small"),
          setup=lambda ctx: os.makedirs(os.path.join(ctx.work, "small")), outputs=("small",),
          needs="unshare",
          error="error: the KV cache needs 0.1 MiB on this rank, {work}/small has 0.0 MiB "
          "free (lower --max-seq-len or --parallel, use --kv-cache-float-type f16, or another "
          "--kv-cache-dir)"),
        C("kv-memory-too-big", "KV cache", "an in-memory KV cache of 512 GB (10^9 positions)",
          infer("{long}", "--max-seq-len", "1000000000"),
          error="re:error: not enough memory on \\S+: this rank needs [0-9.]+ MiB \\(weights "
          "0.7 MiB, KV cache 488281.2 MiB, buffers [0-9.]+ MiB\\), [0-9.]+ MiB available \\(lower --max-seq-len or "
          "--parallel, --kv-cache-float-type f16, --kv-cache-storage disk, or more nodes\\)"),
        C("kv-memory-with-dir", "KV cache", "--kv-cache-storage memory with --kv-cache-dir",
          infer("{tiny}", "--kv-cache-storage", "memory", "--kv-cache-dir", "{work}"),
          error="error: --kv-cache-dir is for --kv-cache-storage disk, not memory"),
        C("kv-disk-default-2r", "KV cache", "disk KV in $TMPDIR, 2 ranks: the tokens of one "
          "process with the KV in memory; nothing left", infer("{tiny}", "--kv-cache-storage",
                                                               "disk", "--json", "--steps", "12"),
          ranks=2, code=0, verify=_same_tokens_as_memory),
        C("kv-f16-disk-2r", "KV cache", "an f16 KV cache on disk, 2 ranks",
          infer("{tiny}", "--kv-cache-float-type", "f16", "--kv-cache-dir", "{work}"),
          ranks=2, code=0),
        C("kv-stale-folder", "KV cache", "a dead job's KV folder in $TMPDIR: removed, the run "
          "goes on", infer("{tiny}", "--kv-cache-storage", "disk"), code=0,
          setup=_stale_folder),
        # ---------------------------------------------------------------- signals and ranks
        C("sigterm-job-2r", "signal", "SIGTERM to mpiexec mid-generation (disk KV)",
          ["inference", "--model", "{long}", "--kv-cache-storage", "disk"] + RUN_LONG,
          ranks=2, code=143, during=_signal_job(TERM), verify=_ended_within(10),
          error="error: interrupted by SIGTERM"),
        C("sigint-job-2r", "signal", "SIGINT (Ctrl-C) to mpiexec mid-generation",
          ["inference", "--model", "{long}", "--kv-cache-storage", "disk"] + RUN_LONG,
          ranks=2, code=130, during=_signal_job(INT), verify=_ended_within(10),
          error="error: interrupted by SIGINT"),
        C("sigterm-worker-2r", "signal", "SIGTERM to rank 1 only, mid-generation",
          ["inference", "--model", "{long}", "--kv-cache-storage", "disk"] + RUN_LONG,
          ranks=2, code=143, during=_signal_rank(1, TERM), verify=_ended_within(10),
          error="error: interrupted by SIGTERM on rank 1"),
        C("sigterm-1r", "signal", "SIGTERM to one process mid-generation (disk KV)",
          ["inference", "--model", "{long}", "--kv-cache-storage", "disk"] + RUN_LONG,
          code=143, during=_signal_job(TERM), verify=_ended_within(10),
          error="error: interrupted by SIGTERM"),
        C("sigint-1r", "signal", "SIGINT to one process mid-generation",
          ["inference", "--model", "{long}"] + RUN_LONG, code=130,
          during=_signal_job(INT), verify=_ended_within(10),
          error="error: interrupted by SIGINT"),
        C("sigkill-rank-2r", "signal", "SIGKILL of rank 1 mid-generation (disk KV)",
          ["inference", "--model", "{long}", "--kv-cache-storage", "disk"] + RUN_LONG,
          ranks=2, code=9, during=_signal_rank(1, KILL), verify=_killed_rank_named),
        C("sigterm-batch-2r", "signal", "SIGTERM to a batch job: whole records only, exit "
          "75 (resumable), no temporary file", ["batch", "--model", "{long}", "--input",
                                                "in.jsonl", "--output", "out.jsonl",
                                                "--max-batch", "2", "--steps", "3000",
                                                "--ignore-eos", "--max-seq-len", "4096",
                                                "--temperature", "0", "--nthreads", "1",
                                                "--quiet", "--stop-timeout", "2"],
          ranks=2, code=75, setup=_batch_input(8), outputs=("in.jsonl", "out.jsonl"),
          during=lambda ctx: (time.sleep(4), ctx.notes.setdefault("sent", time.monotonic()),
                              ctx.proc.send_signal(TERM)),
          verify=lambda ctx, r: _batch_records(8, 0, partial=True)(ctx, r)
          + _ended_within(15)(ctx, r)),
        # ---------------------------------------------------------------- batch
        C("batch-2r", "batch", "6 prompts, 2 at a time, 2 ranks: every result, in order",
          ["batch", "--model", "{tiny}", "--input", "in.jsonl", "--output", "out.jsonl",
           "--parallel", "2", "--quiet"] + GEN, ranks=2, code=0, setup=_batch_input(6),
          outputs=("in.jsonl", "out.jsonl"), verify=_batch_records(6, 0)),
        C("batch-input-missing", "batch", "a prompts file that does not exist",
          ["batch", "--model", "{tiny}", "--input", "in.jsonl", "--output", "out.jsonl"] + GEN,
          error="error: cannot read in.jsonl: No such file or directory"),
        C("batch-bad-line", "batch", "a prompts line that is not JSON: its error record",
          ["batch", "--model", "{tiny}", "--input", "in.jsonl", "--output", "out.jsonl",
           "--quiet"] + GEN,
          setup=_raw_input(b'{"prompt": "ok"}\n{"prompt": \n'),
          outputs=("in.jsonl", "out.jsonl"), code=0, verify=_batch_records(1, 1)),
        C("batch-output-dir-missing", "batch", "a results file in a folder that does not "
          "exist", ["batch", "--model", "{tiny}", "--input", "in.jsonl", "--output",
                    "nope/out.jsonl"] + GEN, setup=_batch_input(1), outputs=("in.jsonl",),
          error="error: cannot write nope/out.jsonl: {work}/nope is not a writable folder"),
        C("batch-prompt-too-long", "batch", "prompts longer than the context: an error "
          "record each (context_length_exceeded)", ["batch", "--model", "{tiny}", "--input",
                                                    "in.jsonl", "--output", "out.jsonl",
                                                    "--max-seq-len", "8", "--quiet"] + GEN,
          setup=_batch_input(2, text="a long prompt " * 5), outputs=("in.jsonl", "out.jsonl"),
          code=0, verify=_batch_records(0, 2)),
        # ---------------------------------------------------------------- serve
        C("serve-port-out-of-range", "serve", "--port 70000",
          ["serve", "--model", "{tiny}", "--port", "70000", "--nthreads", "1"], code=2,
          error="error: argument --port: must be in [0, 65535], got 70000 (see dllama_mpi "
          "serve --help)"),
        C("serve-port-in-use", "serve", "a port another process listens on",
          ["serve", "--model", "{tiny}", "--port", "{port}", "--nthreads", "1"],
          setup=_busy_port,
          error="error: cannot serve on 127.0.0.1:{port} (see the message above)"),
        C("serve-sigterm-idle-2r", "serve", "SIGTERM to a serving job, idle (disk KV): a clean "
          "stop", ["serve", "--model", "{tiny}", "--port", "0", "--nthreads", "1",
                   "--kv-cache-storage", "disk"], ranks=2, code=0,
          during=_serve_then(TERM), verify=_ended_within(10)),
        C("serve-sigterm-streaming-2r", "serve", "SIGTERM while a client streams: its stream "
          "ends, the job stops", ["serve", "--model", "{long}", "--port", "0", "--nthreads",
                                  "1", "--max-seq-len", "16384"], ranks=2, code=0,
          during=_serve_then(TERM, request=True), verify=_stream_ended),
        C("serve-sigkill-worker-2r", "serve", "SIGKILL of rank 1 while a client streams",
          ["serve", "--model", "{long}", "--port", "0", "--nthreads", "1", "--max-seq-len",
           "16384"], ranks=2, code=9, during=_serve_then(KILL, request=True, rank=1),
          verify=_stream_ended),
        # ---------------------------------------------------------------- convert
        C("convert-sigterm", "convert", "SIGTERM mid-convert: no temporary or partial file",
          ["convert", "{big}", "-o", "out.h5", "--no-progress", "--weights-float-type", "q40"],
          code=143, during=_wait_tmp_then_term,
          verify=lambda ctx, r: _signalled(ctx) + _no_output("out.h5")(ctx, r),
          error="error: interrupted by SIGTERM"),
        C("convert-sigterm-existing", "convert", "SIGTERM mid-convert onto an existing file: "
          "the old file untouched", ["convert", "{big}", "-o", "out.h5", "--no-progress",
                                     "--weights-float-type", "q40"],
          code=143, setup=_existing_output, outputs=("out.h5",), during=_wait_tmp_then_term,
          verify=lambda ctx, r: _signalled(ctx) + _unchanged_output(ctx, r),
          error="error: interrupted by SIGTERM"),
        C("convert-onto-existing", "convert", "convert onto an existing file: replaced once "
          "complete", ["convert", "{tiny}", "-o", "out.h5", "--no-progress"], code=0,
          setup=_existing_output, outputs=("out.h5",), verify=_converted),
        C("convert-onto-source", "convert", "convert onto its own source",
          ["convert", "{tiny}", "-o", "{tiny}", "--no-progress"],
          error="error: the output would overwrite the source"),
        C("convert-missing-dir", "convert", "convert to a folder that does not exist",
          ["convert", "{tiny}", "-o", "nope/out.h5", "--no-progress"],
          error="error: cannot write nope/out.h5: the folder nope does not exist"),
        C("convert-unwritable", "convert", "convert into a read-only folder",
          ["convert", "{tiny}", "-o", "/sys/out.h5", "--no-progress"],
          error="re:error: cannot write /sys/out\\.h5: (Permission denied|Read-only file system)"),
        C("convert-onto-directory", "convert", "convert onto an existing directory",
          ["convert", "{tiny}", "-o", "{work}", "--no-progress"],
          error="error: cannot write {work}: it is a directory (give a file name)"),
    ]
    return out


# ----------------------------------------------------------------------------- running

_UNSHARE: bool | None = None


def unshare_works() -> bool:
    global _UNSHARE
    if _UNSHARE is None:
        try:
            _UNSHARE = subprocess.run(["unshare", "-m", "true"], capture_output=True,
                                      timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            _UNSHARE = False
    return _UNSHARE


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env(ctx: Ctx, extra: dict) -> dict:
    """The program of this checkout (cwd is the case's folder), its own $TMPDIR."""
    path = os.pathsep.join(p for p in [REPO, os.environ.get("PYTHONPATH")] if p)
    env = dict(os.environ, TMPDIR=ctx.tmp, PYTHONUNBUFFERED="1", PYTHONPATH=path, **extra)
    for var in ("SLURM_TMPDIR", "SLURM_JOB_ID"):
        env.pop(var, None)
    return env


def _files(folder: str) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        for n in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, n), folder))
    return out


def run_case(case: Case, fx: dict[str, str], root: str) -> Result:
    if case.skip:
        return Result(None, "", "", 0.0, False, [], [], skipped=case.skip)
    if case.needs == "unshare" and not unshare_works():
        return Result(None, "", "", 0.0, False, [], [], skipped="no mount namespaces here")
    base = os.path.join(root, "cases", case.id)
    shutil.rmtree(base, ignore_errors=True)
    ctx = Ctx(fx, os.path.join(base, "work"), os.path.join(base, "tmp"), base)
    os.makedirs(ctx.work)
    os.makedirs(ctx.tmp)
    if case.setup is not None:
        case.setup(ctx)
    before_tmp = _files(ctx.tmp)
    argv = [ctx.fmt(a) for a in case.args]
    if argv[0] != "unshare":
        argv = [sys.executable, "-m", "dllama_mpi"] + argv
    if case.ranks > 1:
        argv = [MPIEXEC, "-n", str(case.ranks)] + argv
    t0 = time.monotonic()
    with open(os.path.join(base, "stdout"), "w") as out, open(os.path.join(base, "stderr"), "w") as err:
        ctx.proc = subprocess.Popen(argv, stdout=out, stderr=err, cwd=ctx.work,
                                    env=_env(ctx, case.env), start_new_session=True)
        timed_out = False
        try:
            if case.during is not None:
                case.during(ctx)
            ctx.proc.wait(timeout=max(1.0, TIMEOUT - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(ctx.proc.pid, signal.SIGKILL)
            ctx.proc.wait()
        ctx.notes["ended"] = time.monotonic()
        if "socket" in ctx.notes:
            ctx.notes["socket"].close()
    seconds = time.monotonic() - t0
    with open(os.path.join(base, "stdout"), errors="replace") as f:
        stdout = f.read()
    stderr = ctx.stderr()
    leftovers = sorted(f"work/{p}" for p in _files(ctx.work) - set(_allowed(case, ctx)))
    leftovers += sorted(f"$TMPDIR/{p}" for p in _files(ctx.tmp) - before_tmp
                        if not p.startswith("numba"))
    if case.id == "kv-stale-folder" and _files(ctx.tmp):
        leftovers.append("the stale folder is still there")
    result = Result(ctx.proc.returncode, stdout, stderr, seconds, timed_out, leftovers, [])
    result.problems = problems(case, ctx, result)
    result.summary = ctx.notes.get("summary", "")
    return result


def run_all(root: str, selected: list[str] | None = None, progress=None):
    """Fixtures, then every case (or the selected ids): [(case, result)]."""
    fx = build_fixtures(root)
    out = []
    for case in cases():
        if selected and case.id not in selected:
            continue
        r = run_case(case, fx, root)
        out.append((case, r))
        if progress is not None:
            progress(case, r)
    return out


def _allowed(case: Case, ctx: Ctx) -> list[str]:
    allowed = []
    for name in case.outputs:
        allowed.append(name)
        path = os.path.join(ctx.work, name)
        if os.path.isdir(path):
            allowed += [os.path.join(name, p) for p in _files(path)]
    return allowed


def _format_pattern(case: Case, ctx: Ctx) -> str:
    """A regex template: the {name} fields are paths, escaped; the rest is a regex."""
    text = case.error[3:]

    def sub(m):
        key = m.group(1)
        if key in ctx.fx or key in ctx.vars or key in ("work", "tmp"):
            return re.escape(ctx.fmt("{" + key + "}"))
        return m.group(0)
    return re.sub(r"\{(\w+)\}", sub, text)


def problems(case: Case, ctx: Ctx, r: Result) -> list[str]:
    found = []
    if r.timed_out:
        return [f"hung: no exit after {TIMEOUT} s"]
    if r.code != case.code:
        found.append(f"exit code {r.code}, expected {case.code}")
    if "Traceback" in r.stderr:
        found.append("a Python traceback on stderr")
    lines = r.error_lines
    if case.error is None:
        if lines:
            found.append(f"unexpected error lines {lines}")
    elif case.error.startswith("re:"):
        pattern = _format_pattern(case, ctx)
        if len(lines) != 1 or not re.fullmatch(pattern, lines[0]):
            found.append(f"error lines {lines}, expected one matching {pattern!r}")
    else:
        want = ctx.fmt(case.error)
        if lines != [want]:
            found.append(f"error lines {lines}, expected [{want!r}]")
    if r.leftovers:
        found.append(f"left behind: {r.leftovers}")
    if case.verify is not None and not r.timed_out:
        found += case.verify(ctx, r)
    return found


def outcome(case: Case, r: Result) -> str:
    """One cell of the table: what happened."""
    if r.skipped:
        return f"not yet: {r.skipped}"
    if r.timed_out:
        return "HUNG"
    text = f"exit {r.code}"
    if r.error_lines:
        text += f": `{_shorten(r.error_lines[0])}`"
    if r.summary:
        text += f"; {r.summary}"
    return text


def _shorten(line: str, n: int = 160) -> str:
    line = re.sub(r"/\S*/(models|cases)/(\S+/)?", "…/", line)
    return line if len(line) <= n else line[:n - 1] + "…"
