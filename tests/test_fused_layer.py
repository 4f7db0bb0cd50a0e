"""Every layer in one parallel region (kernels/fused_layer.py, one rank) gives the bits of the
layers run step by step: the logits of prompts, of decode steps of many sequences and of mixed
steps, at 1 and 2 threads, with Q4_0 and Q4_1 weights and f32 and f16 KV caches; and of the
unfused kernels on every fused path (avxvnni and avx2 forced on an AVX-512 VNNI host), by token groups and by row
bands; bind_layers says None where the layers cannot run so."""
import numpy as np
import pytest

from dllama_mpi import kernels as K
from dllama_mpi.comm import SerialComm
from dllama_mpi.config import RunConfig
from dllama_mpi.kernels import simd
from dllama_mpi.kernels.fused_tokens import _PATH_TAGS
from dllama_mpi.kernels.matmul import _matmul_unchecked
from dllama_mpi.quant import Q41Matrix, quantize_q41
from dllama_mpi.runtime.startup import start
from test_kernels import threads  # noqa: F401  (the fixture)
from tiny import write_tiny_gguf

FUSED = [p for p in simd.HOST_PATHS if p in _PATH_TAGS]     # vnni512, avxvnni, avx2
N_SEQ = 18
PROMPT_LENS = [9 + 2 * i for i in range(N_SEQ)]
needs_fused = pytest.mark.skipif(not FUSED, reason="the fused layers run on the vnni512, avxvnni and "
                                                   "avx2 paths (none here)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fused_layer")
    return {w: write_tiny_gguf(str(folder / f"{w}.gguf"), "q40_9h", w) for w in ("q4_0", "q4_1")}


@pytest.fixture
def keep_threads():
    old = K.get_num_threads()
    yield
    K.set_num_threads(old)


def _run(path, nthreads, kv, monkeypatch, whole: bool):
    """Logits of every step below, and per step whether its layers ran in one region
    (kernels.bind_layers wrapped: with whole=False it binds nothing and the steps run one by
    one)."""
    runs = []
    real = K.bind_layers

    def bind(*args, **kw):
        call = real(*args, **kw) if whole else None
        if call is None:
            return None

        def counted():
            runs.append(call())
            return runs[-1]
        return counted
    with monkeypatch.context() as m:
        m.setattr(K, "bind_layers", bind)
        run = RunConfig(max_seq_len=64, parallel=N_SEQ, nthreads=nthreads, kv_cache_float_type=kv)
        engine = start(SerialComm(), path, run, want_tokenizer=False).engine
        runs.clear()                              # (the warmup's layers, on the first start)
        r = np.random.default_rng(0)
        ids = r.integers(3, 300, 200).tolist()
        lens = list(PROMPT_LENS)
        out = [engine.forward(ids[i:i + n], 0, all_logits=True, slot=i) for i, n in enumerate(lens)]
        rows = np.arange(N_SEQ, dtype=np.int32)
        for step in range(3):                     # every sequence one row: decode steps
            out.append(engine.forward_rows(ids[50 + step:50 + step + N_SEQ], np.array(lens, np.int32) + step,
                                           rows, rows))
        lens = [n + 3 for n in lens]
        # sequence 0's 6 rows and one row of 12 others: apart in 2 token groups of 9
        slots = np.array([0] * 6 + list(range(1, 13)), np.int32)
        positions = np.array([lens[0] + i for i in range(6)] + lens[1:13], np.int32)
        out.append(engine.forward_rows(ids[100:118], positions, slots, np.arange(18, dtype=np.int32)))
        lens[0] += 6
        # sequence 13's 10 rows and one row of 8 others: in both token groups on 2 threads
        slots = np.array([13] * 10 + list(range(1, 9)), np.int32)
        positions = np.array([lens[13] + i for i in range(10)] + lens[1:9], np.int32)
        out.append(engine.forward_rows(ids[120:138], positions, slots, np.arange(18, dtype=np.int32)))
        out.append(engine.forward(ids[140:141], lens[0], slot=0))      # one sequence, one row
        engine.stop()
    return out, runs


@needs_fused
@pytest.mark.parametrize("weights", ["q4_0", "q4_1"])
@pytest.mark.parametrize("kv", ["f32", "f16"])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_whole_layer_gives_the_bits_of_its_steps(weights, kv, nthreads, tiny, monkeypatch, keep_threads):
    got, runs = _run(tiny[weights], nthreads, kv, monkeypatch, whole=True)
    want, none = _run(tiny[weights], nthreads, kv, monkeypatch, whole=False)
    assert none == []
    assert len(got) == len(want) == N_SEQ + 6
    for step, (g, w) in enumerate(zip(got, want)):
        assert np.array_equal(g, w), f"step {step}"
    if nthreads == 1:          # one token group: every step, one row or many
        assert runs == [True] * (N_SEQ + 6)
    else:                      # by row bands: the prompts of fewer than 16 rows and the one-row
        # step; by token groups: the decode steps and the step whose sequences keep to them;
        # not the prompts of 16 rows or more, nor the step whose sequence crosses the groups
        assert runs == [n < 16 for n in PROMPT_LENS] + [True] * 4 + [False, True]


def _layer_args(T, wo=None, slots=None, positions=None, kv=np.float32, ffn=96):
    """bind_layers' arguments for two layers of 2 query heads and 1 KV head of 32 on 64
    columns (the second layer's wo: `wo`), their caches' earlier positions random."""
    r = np.random.default_rng(1)
    n, hd = 64, 32

    def q41(rows, cols):
        return Q41Matrix.from_blocks(quantize_q41(r.standard_normal((rows, cols)).astype(np.float32)))

    def acts(width):
        return np.zeros((T, width), np.float32), np.zeros((T, width), np.int8), np.zeros((T, width // 32), np.float32)
    def layer(wo=None):
        cache = r.standard_normal((2, T, 24, 1, hd)).astype(kv)
        norms = (1 + 0.1 * r.standard_normal((2, n))).astype(np.float32)
        return (norms[0], norms[1], q41(4 * hd, n), q41(n, 2 * hd) if wo is None else wo, q41(2 * ffn, n),
                q41(n, ffn), cache[0], cache[1])
    return (r.standard_normal((T, n)).astype(np.float32), 1e-5, *acts(n), np.zeros((T, 4 * hd), np.float32),
            *acts(2 * hd), np.zeros((T, n), np.float32), np.zeros((T, 2 * ffn), np.float32), *acts(ffn),
            np.zeros((T, n), np.float32), [layer(), layer(wo)],
            np.zeros(T, np.int32) if positions is None else positions,
            np.arange(T, dtype=np.int32) if slots is None else slots,
            np.ones((24, hd // 2), np.float32), np.zeros((24, hd // 2), np.float32), np.zeros(2, np.int32), 0.2)


def _by_steps(args, path):
    """x after bind_layers' layers, each run by the unfused kernels on kernel path `path`."""
    (x, eps, xb, xbq, xbd, qkv, att, attq, attd, attn_out, h13, h, hq, hs, ffn_out, layers, positions, slots,
     cos, sin, kv_of_q, scale) = args
    x = x.copy()
    for attn_norm, ffn_norm, wqkv, wo, w13, w2, k_cache, v_cache in layers:
        K.rmsnorm_q80(xb, xbq, xbd, x, attn_norm, eps)
        _matmul_unchecked(qkv, xbq, xbd, wqkv, path)
        K.attention_block(att, qkv, k_cache, v_cache, positions, slots, cos, sin, kv_of_q, scale, (attq, attd))
        _matmul_unchecked(attn_out, attq, attd, wo, path)
        x += attn_out
        K.rmsnorm_q80(xb, xbq, xbd, x, ffn_norm, eps)
        _matmul_unchecked(h13, xbq, xbd, w13, path)
        K.silu_mul_q80(h, hq, hs, h13)
        _matmul_unchecked(ffn_out, hq, hs, w2, path)
        x += ffn_out
    return x


@needs_fused
@pytest.mark.parametrize("path", FUSED)
@pytest.mark.parametrize("kv", [np.float32, np.float16])
@pytest.mark.parametrize("T, one_sequence, by, ffn", [(1, False, "", 96), (5, False, "", 96), (16, False, "", 96),
                                                       (21, False, "", 96), (12, True, "", 96),
                                                       (16, False, "bands", 96), (5, False, "", 64)])
def test_layers_give_the_bits_of_the_unfused_kernels(path, kv, T, one_sequence, by, ffn, threads):  # noqa: F811
    """Two layers of 1 to 21 rows (each its own sequence at positions 3.., or one sequence's
    rows at positions 3..3+T-1) on 1 and 2 threads (by token groups or by row bands, or
    forced by bands; an FFN as wide as the model, whose w13 and w2 take inputs of one width),
    f32 and f16 KV caches: x and the caches are what the unfused kernels give on the same
    path."""
    if one_sequence:
        positions, slots = (3 + np.arange(T)).astype(np.int32), np.zeros(T, np.int32)
    else:
        positions, slots = (3 + np.arange(T) % 4).astype(np.int32), np.arange(T, dtype=np.int32)
    want_args, got_args = (_layer_args(T, positions=positions, slots=slots, kv=kv, ffn=ffn) for _ in range(2))
    want = _by_steps(want_args, path)
    call = K.bind_layers(*got_args, path=path, by=by)
    assert call is not None and call() is True
    np.testing.assert_array_equal(got_args[0], want)
    for (*_, kc, vc), (*_, kc_want, vc_want) in zip(got_args[15], want_args[15]):
        np.testing.assert_array_equal(kc, kc_want)
        np.testing.assert_array_equal(vc, vc_want)


@needs_fused
def test_bind_layers_says_where_they_cannot_run(keep_threads):
    K.set_num_threads(2)
    assert K.bind_layers(*_layer_args(16)) is not None
    assert K.bind_layers(*_layer_args(15)) is not None                    # fewer than 8 rows a thread: bands
    K.set_num_threads(1)
    assert K.bind_layers(*_layer_args(1)) is not None                     # on one thread, any rows
    K.set_num_threads(2)
    assert K.bind_layers(*_layer_args(16), path="generic") is None        # not on the portable path
    f32_wo = np.zeros((64, 64), np.float32)
    assert K.bind_layers(*_layer_args(16, wo=f32_wo)) is None             # a matrix not of Q4 row tiles (2nd layer)
    crossing = K.bind_layers(*_layer_args(16, slots=np.array([0] * 10 + list(range(1, 7)), np.int32)))
    assert crossing() is False                                           # slot 0 in both token groups
    bad = K.bind_layers(*_layer_args(16, slots=np.full(16, 99, np.int32)))
    with pytest.raises(ValueError, match="slots"):                       # checked at every call
        bad()
