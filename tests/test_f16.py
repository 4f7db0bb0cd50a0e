"""F16 weights at run time (--weights-float-type f16): the kernel against numpy, a whole
model against the F32 path on the same file's values, memory, and SmolLM2 (slow)."""
import numpy as np
import pytest

from dllama_mpi import kernels
from dllama_mpi.comm import SerialComm
from dllama_mpi.kernels.matmul_f16 import _f16_rows_par, _f16_rows_serial
from tiny import our_greedy, our_logits, smollm2_path, tolerance, write_tiny_gguf

IDS = [1, 17, 42, 99, 3, 150, 7, 64, 5, 180, 2, 33]


@pytest.mark.parametrize("t", [1, 3, 4, 9])
@pytest.mark.parametrize("rows,cols", [(1, 32), (37, 96), (300, 1000)])
def test_f16_matmul_equals_widened_product(t, rows, cols):
    rng = np.random.default_rng(rows + t)
    w = rng.standard_normal((rows, cols)).astype(np.float16)
    x = rng.standard_normal((t, cols)).astype(np.float32)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    scale = np.abs(x).astype(np.float64) @ np.abs(w.astype(np.float64)).T
    out = np.empty((t, rows), np.float32)
    kernels.matmul_f16(out, x, w)
    assert np.all(np.abs(out - ref) <= 1e-6 * scale + 1e-6)
    for fn in (_f16_rows_serial, _f16_rows_par):   # both paths, whatever the dispatch picks
        o = np.full((t, rows), np.nan, np.float32)
        fn(o, x, w.view(np.uint16), rows, cols, t)
        assert np.all(np.abs(o - ref) <= 1e-6 * scale + 1e-6)


def test_f16_matmul_checks_its_arguments():
    x = np.zeros((2, 64), np.float32)
    with pytest.raises(ValueError, match="float16"):
        kernels.matmul_f16(np.zeros((2, 3), np.float32), x, np.zeros((3, 64), np.float32))
    with pytest.raises(ValueError, match="columns"):
        kernels.matmul_f16(np.zeros((2, 3), np.float32), x, np.zeros((3, 32), np.float16))


@pytest.mark.parametrize("shape", ["gqa6", "mqa3_tied"])
def test_f16_weights_run_like_f32_on_an_f16_file(tmp_path, shape):
    """An F16 file: its values exactly, half the bytes; only summation order differs from
    the F32 path (and the logits' f32 path holds the same values)."""
    path = write_tiny_gguf(str(tmp_path / "m.gguf"), shape, "f16")
    f16 = our_logits(SerialComm(), path, IDS, weights="f16")
    f32 = our_logits(SerialComm(), path, IDS, weights="f32")
    np.testing.assert_allclose(f16, f32, rtol=0, atol=tolerance(f32))
    assert our_greedy(SerialComm(), path, IDS[:4], 12, weights="f16") == \
        our_greedy(SerialComm(), path, IDS[:4], 12, weights="f32")


def test_f16_weights_hold_half_the_bytes(tmp_path):
    from dllama_mpi import memory
    from dllama_mpi.config import RunConfig
    from dllama_mpi.runtime.startup import start
    path = write_tiny_gguf(str(tmp_path / "m.gguf"), "q40_9h", "f16")
    held = {}
    for w in ("f16", "f32"):
        s = start(SerialComm(), path, RunConfig(weights_float_type=w, max_seq_len=16,
                                                nthreads=1), want_tokenizer=False)
        assert (s.run.weights_float_type, s.run.output_float_type,
                s.run.buffer_float_type) == (w, w, "f32")
        held[w] = s.engine.model.w.nbytes()
        assert memory.per_rank(s.config, s.run, 1)[0].weights == held[w]
    c = s.config
    vectors = (2 * c.dim * c.n_layers + c.dim) * 4
    assert 2 * (held["f16"] - vectors) == held["f32"] - vectors


@pytest.mark.slow
def test_smollm2_f16_greedy_equals_f32_on_the_same_values(tmp_path):
    """SmolLM2 converted to an F16 store: 32 greedy tokens with F16 weights at run time
    equal the F32 path's on those very values."""
    from dllama_mpi.apps.convert import convert
    from dllama_mpi.tokenizer import Tokenizer
    src = smollm2_path()
    h5 = convert(src, str(tmp_path / "smollm2-f16.h5"), "f16", progress=False)[0]
    ids = Tokenizer.from_gguf(src).encode("The capital of France is")
    f16 = our_greedy(SerialComm(), h5, ids, 32, weights="f16", max_seq_len=64)
    f32 = our_greedy(SerialComm(), h5, ids, 32, weights="f32", max_seq_len=64)
    assert f16 == f32
