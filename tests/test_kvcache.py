"""The KV cache's storages: memory and disk give the same results; disk files are named by
job and rank, reserved up front, never left behind; clear errors; f16 halves the bytes and
attention reads it (kernels against a numpy twin); memory.py predicts every combination."""
import math
import os
import time

import numpy as np
import pytest

from dllama_mpi import kernels as K
from dllama_mpi import kvcache, memory
from dllama_mpi.comm import SerialComm
from dllama_mpi.config import RunConfig
from dllama_mpi.errors import DllamaError
from dllama_mpi.kvcache import KVCache
from dllama_mpi.runtime.generation import generate
from dllama_mpi.runtime.startup import start
from tiny import write_tiny_gguf


def _cache(tmp_path, **kw):
    args = dict(n_layers=2, max_seq_len=16, n_kv_heads=2, head_dim=8)
    args.update(kw)
    return KVCache(args.pop("n_layers"), args.pop("max_seq_len"), args.pop("n_kv_heads"),
                   args.pop("head_dim"), **args)


# ----------------------------------------------------------------------------- disk files

def test_disk_cache_leaves_nothing_on_disk_even_while_open(tmp_path):
    kv = _cache(tmp_path, directory=str(tmp_path), job="j1", tag="rank0")
    kv.k[1, 0, 3] = 7.0
    assert kv.storage == "disk" and kv.k[1, 0, 3, 0, 0] == 7.0
    assert os.listdir(tmp_path) == []            # unlinked once mapped, folder removed
    maps = open("/proc/self/maps").read()
    assert "dllama-kv-j1/rank0.k (deleted)" in maps   # ... but still mapped
    kv.close()


def test_two_jobs_and_ranks_in_one_folder_never_collide(tmp_path):
    caches = [_cache(tmp_path, directory=str(tmp_path), job=job, tag=f"rank{r}")
              for job in ("a", "b") for r in range(2)]
    for i, kv in enumerate(caches):
        kv.v[...] = i
    assert [int(kv.v[0, 0, 0, 0, 0]) for kv in caches] == [0, 1, 2, 3]
    assert os.listdir(tmp_path) == []


def test_a_rank_racing_another_for_the_folder_still_makes_its_cache(tmp_path, monkeypatch):
    """Two ranks of a node: one's makedirs meets the folder the other made, and the other
    removes it before makedirs can see it is a folder (FileExistsError; seen once in the
    fault suite's kv-f16-disk-2r): the cache is made all the same, and nothing is left."""
    real, calls = os.makedirs, []

    def racing(path, exist_ok=False):
        calls.append(path)
        if len(calls) == 1:
            raise FileExistsError(17, "File exists", path)
        return real(path, exist_ok=exist_ok)
    monkeypatch.setattr(kvcache.os, "makedirs", racing)
    kv = _cache(tmp_path, directory=str(tmp_path), job="race", tag="rank1")
    kv.k[0, 0, 1] = 3.0
    assert kv.k[0, 0, 1, 0, 0] == 3.0 and len(calls) >= 2
    assert os.listdir(tmp_path) == []
    kv.close()


def test_job_tags_are_unique():
    assert len({kvcache.job_tag() for _ in range(50)}) == 50


def test_default_directory_is_node_local_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("SLURM_TMPDIR", raising=False)
    assert kvcache.node_tmpdir() == str(tmp_path)
    slurm = tmp_path / "slurm"
    slurm.mkdir()
    monkeypatch.setenv("SLURM_TMPDIR", str(slurm))
    assert kvcache.node_tmpdir() == str(slurm)
    kv = _cache(tmp_path, storage="disk")
    assert kv.folder.startswith(str(slurm) + "/dllama-kv-")


def _dead_job(base, name, age=3600.0, files=("rank0.k", "rank0.v")):
    folder = base / name
    folder.mkdir()
    for f in files:
        (folder / f).write_bytes(b"\0" * 64)
    old = time.time() - age
    for p in list(folder.iterdir()) + [folder]:
        os.utime(p, (old, old))
    return folder


def test_stale_folders_of_dead_jobs_are_removed(tmp_path):
    dead = _dead_job(tmp_path, "dllama-kv-dead")
    young = _dead_job(tmp_path, "dllama-kv-young", age=5)          # maybe a live job's
    foreign = _dead_job(tmp_path, "dllama-kv-foreign", files=("notes.txt",))
    other = _dead_job(tmp_path, "someone-else")
    kv = _cache(tmp_path, directory=str(tmp_path), job="new")
    assert not dead.exists()
    assert young.exists() and foreign.exists() and other.exists()
    kv.close()


@pytest.mark.parametrize("what,message", [
    ("missing", r"does not exist \(create it first\)"),
    ("file", "is not a directory"),
])
def test_directory_errors(tmp_path, what, message):
    path = tmp_path / "x"
    if what == "file":
        path.write_text("x")
    with pytest.raises(DllamaError, match=message):
        _cache(tmp_path, directory=str(path))


def test_not_enough_space_is_an_error_before_any_file(tmp_path, monkeypatch):
    monkeypatch.setattr(kvcache, "free_bytes", lambda path: 1000)
    with pytest.raises(DllamaError, match=r"needs 0\.0 MiB on this rank, .* has 0\.0 MiB free"):
        _cache(tmp_path, directory=str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_fallocate_without_space_is_the_same_error(tmp_path, monkeypatch):
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(DllamaError, match="the KV cache needs"):
        _cache(tmp_path, directory=str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_storage_and_float_type(tmp_path):
    f32 = _cache(tmp_path)
    f16 = _cache(tmp_path, float_type="f16", storage="disk", directory=str(tmp_path))
    assert f32.storage == "memory" and f32.k.dtype == np.float32
    assert f16.k.dtype == np.float16 and f16.nbytes * 2 == f32.nbytes
    with pytest.raises(DllamaError, match="--kv-cache-float-type"):
        _cache(tmp_path, float_type="bf16")
    with pytest.raises(DllamaError, match="--kv-cache-storage"):
        _cache(tmp_path, storage="tape")


# ----------------------------------------------------------------------------- whole model

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_gguf(str(tmp_path_factory.mktemp("kv") / "m.gguf"), "gqa6", "f32")


def _greedy(path, **run):
    s = start(SerialComm(), path, RunConfig(weights_float_type="f32", max_seq_len=48, nthreads=1,
                                            **run), want_tokenizer=False)
    try:
        g = generate(s.engine, [1, 5, 9, 200, 17], 24, lambda l: int(np.argmax(l)), set(), 48)
        logits = s.engine.forward([3, 4, 5], 29)
        return g.generated_tokens, logits, s
    finally:
        s.close()


def test_disk_cache_gives_the_bits_of_the_memory_cache(model, tmp_path):
    mem_tokens, mem_logits, s = _greedy(model)
    assert s.engine.model.kv.storage == "memory"
    disk_tokens, disk_logits, s = _greedy(model, kv_cache_dir=str(tmp_path))
    assert s.engine.model.kv.storage == "disk"
    assert disk_tokens == mem_tokens
    np.testing.assert_array_equal(disk_logits, mem_logits)
    assert os.listdir(tmp_path) == []


def test_f16_cache_runs_close_to_f32(model):
    tokens, logits, _ = _greedy(model)
    tokens16, logits16, s = _greedy(model, kv_cache_float_type="f16")
    assert s.engine.model.kv.k.dtype == np.float16
    scale = float(np.abs(logits).max())
    assert float(np.abs(logits16 - logits).max()) < 2e-2 * scale
    assert tokens16[:8] == tokens[:8]


@pytest.mark.parametrize("storage,float_type", [("memory", "f32"), ("memory", "f16"),
                                                ("disk", "f32"), ("disk", "f16")])
def test_memory_predicts_every_storage(model, tmp_path, storage, float_type):
    run = RunConfig(weights_float_type="f32", max_seq_len=40, nthreads=1, parallel=3,
                    kv_cache_storage=storage, kv_cache_float_type=float_type,
                    kv_cache_dir=str(tmp_path) if storage == "disk" else None)
    s = start(SerialComm(), model, run, want_tokenizer=False)
    held, predicted = s.memory[0], memory.per_rank(s.config, s.run, 1)[0]
    assert held.kv_cache == predicted.kv_cache == s.engine.model.kv.nbytes
    assert held.kv_on_disk == predicted.kv_on_disk == (storage == "disk")
    assert predicted.total == (predicted.weights + predicted.buffers
                               + (0 if storage == "disk" else predicted.kv_cache))
    s.close()


# ----------------------------------------------------------------------------- f16 kernels

def naive_attention_f16(q, kc16, vc16, pos, kv_of_q, scale):
    """The numpy twin: f16 K/V widened exactly, f64 math."""
    T, width = q.shape
    hd = kc16.shape[2]
    out = np.zeros((T, width))
    for t in range(T):
        n = pos[t] + 1
        for h in range(width // hd):
            k = kc16[:n, kv_of_q[h]].astype(np.float64)
            v = vc16[:n, kv_of_q[h]].astype(np.float64)
            s = scale * (k @ q[t, h * hd:(h + 1) * hd].astype(np.float64))
            p = np.exp(s - s.max())
            out[t, h * hd:(h + 1) * hd] = (p / p.sum()) @ v
    return out


def _rope_tables(S, hd):
    inv = 10000.0 ** (-np.arange(hd // 2) * 2 / hd)
    ang = np.outer(np.arange(S), inv)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


@pytest.mark.parametrize("T,S", [(1, 20), (5, 40), (3, 700)])
@pytest.mark.parametrize("threads", [1, 2])
def test_attention_reads_f16_like_its_numpy_twin(T, S, threads):
    K.set_num_threads(min(threads, K.max_threads()))
    r = np.random.default_rng(T + S)
    nq, nkv, hd = 4, 2, 32
    q = r.standard_normal((T, nq * hd)).astype(np.float32)
    kc = r.standard_normal((S, nkv, hd)).astype(np.float16)
    vc = r.standard_normal((S, nkv, hd)).astype(np.float16)
    pos = np.sort(r.integers(0, S, T)).astype(np.int32)
    kvq = np.array([0, 0, 1, 1], np.int32)
    out = np.empty((T, nq * hd), np.float32)
    K.attention(out, q, kc, vc, pos, kvq, 1 / math.sqrt(hd))
    np.testing.assert_allclose(out, naive_attention_f16(q, kc, vc, pos, kvq, 1 / math.sqrt(hd)),
                               rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("q80", [False, True])
def test_attention_block_on_f16_is_f32_on_the_rounded_values(T, q80):
    """attention_block on an f16 cache == attention_block on an f32 cache, the new rows
    rounded to f16 (numpy's astype: nearest-even) before attention reads them. Shared
    arithmetic, so equal to float32 precision (compiled separately: the vector code may sum
    in another order)."""
    r = np.random.default_rng(T)
    nq, nkv, hd, S = 4, 2, 32, 30
    qkv = r.standard_normal((T, (nq + 2 * nkv) * hd)).astype(np.float32)
    k16 = r.standard_normal((2, S, nkv, hd)).astype(np.float16)
    v16 = r.standard_normal((2, S, nkv, hd)).astype(np.float16)
    pos = (np.arange(T) + 9).astype(np.int32)
    slots = np.ones(T, np.int32)
    cos, sin = _rope_tables(S, hd)
    kvq = np.array([0, 0, 1, 1], np.int32)
    # the reference: the f32 kernel stores rope(k) and v; round them to f16, then attend
    k32, v32, qkv32 = k16.astype(np.float32), v16.astype(np.float32), qkv.copy()
    K.attention_block(np.empty((T, nq * hd), np.float32), qkv32, k32, v32, pos, slots, cos,
                      sin, kvq, 0.2)
    k32[1, pos] = k32[1, pos].astype(np.float16)
    v32[1, pos] = v32[1, pos].astype(np.float16)
    ref = np.empty((T, nq * hd), np.float32)
    K.attention(ref, np.ascontiguousarray(qkv32[:, :nq * hd]), k32[1], v32[1], pos, kvq, 0.2)
    out = np.empty((T, nq * hd), np.float32)
    qs, d = np.zeros((T, nq * hd), np.int8), np.zeros((T, nq * hd // 32), np.float32)
    K.attention_block(out, qkv, k16, v16, pos, slots, cos, sin, kvq, 0.2,
                      (qs, d) if q80 else None)
    np.testing.assert_allclose(qkv[:, :nq * hd], qkv32[:, :nq * hd], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(k16.astype(np.float32), k32, rtol=1e-3, atol=1e-6)  # 1 f16 ulp
    np.testing.assert_array_equal(v16.astype(np.float32), v32)       # copies: exact
    np.testing.assert_array_equal(k16[0], k32[0].astype(np.float16))  # slot 0 untouched
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    if q80:
        assert np.abs(qs).max() == 127
