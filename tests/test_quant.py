"""dllama_mpi.quant against gguf.quants (bit-identical) and round trips."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize as g_dequantize, quantize as g_quantize

from dllama_mpi.quant import blocks as quant
from dllama_mpi.quant import (Q40Matrix, dequantize_q40, dequantize_q80, dequantize_q80_parts,
                              quantize_q40, quantize_q80, quantize_q80_parts)

SHAPES = [(1, 32), (7, 96), (33, 160), (3, 5, 64), (2, 2048)]


def _data(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 10.0)).astype(np.float32)
    flat = x.reshape(-1)
    flat[::11] = 0.0
    if flat.size >= 64:
        flat[32:64] = 0.0                                   # an all-zero block (d == 0)
        flat[5] = -abs(flat).max() * 2                      # negative extreme
        flat[6] = -flat[5]                                  # tie in |x|: first index wins
    return x


@pytest.mark.parametrize("shape", SHAPES)
def test_q40_matches_gguf(shape):
    x = _data(shape)
    ours, ref = quantize_q40(x), g_quantize(x, GT.Q4_0)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert np.array_equal(ours, ref)
    assert np.array_equal(dequantize_q40(ours), g_dequantize(ref, GT.Q4_0))


@pytest.mark.parametrize("shape", SHAPES)
def test_q80_matches_gguf(shape):
    x = _data(shape, 1)
    ours, ref = quantize_q80(x), g_quantize(x, GT.Q8_0)
    assert ours.shape == ref.shape and np.array_equal(ours, ref)
    assert np.array_equal(dequantize_q80(ours), g_dequantize(ref, GT.Q8_0))
    qs, ds = quantize_q80_parts(x)
    assert np.array_equal(dequantize_q80_parts(qs, ds), dequantize_q80(ours))


def test_q80_rounding_ties():
    # values exactly on .5 after scaling: d = 127/127 = 1 -> q = roundf(x), half away from zero
    x = np.zeros((1, 32), np.float32)
    x[0, :8] = [127, 0.5, -0.5, 1.5, -1.5, 2.5, 0.49999997, -126.5]
    qs, _ = quantize_q80_parts(x)
    assert qs[0, :8].tolist() == [127, 1, -1, 2, -2, 3, 0, -127]
    assert np.array_equal(quantize_q80(x), g_quantize(x, GT.Q8_0))


def test_round_trip_error_bounds():
    x = _data((9, 256), 2)
    blocks = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
    e40 = np.abs(dequantize_q40(quantize_q40(x)).reshape(-1, 32) - x.reshape(-1, 32))
    assert np.all(e40 <= blocks / 8 * 1.01 + 1e-7)   # step d = max/8, error <= d (clamped top)
    e80 = np.abs(dequantize_q80(quantize_q80(x)).reshape(-1, 32) - x.reshape(-1, 32))
    assert np.all(e80 <= blocks / 127 * 0.51 + blocks * 1e-3)


def test_bad_sizes():
    with pytest.raises(ValueError):
        quantize_q40(np.zeros((2, 33), np.float32))
    with pytest.raises(ValueError):
        quantize_q80(np.zeros(31, np.float32))
    with pytest.raises(ValueError):
        dequantize_q40(np.zeros((2, 17), np.uint8))
    with pytest.raises(ValueError):
        dequantize_q80(np.zeros((2, 34), np.int8))
    with pytest.raises(ValueError):
        Q40Matrix.from_blocks(np.zeros((2, 19), np.uint8))
    with pytest.raises(ValueError):
        Q40Matrix.from_blocks(np.zeros(36, np.uint8))


def test_chunked_path():
    old = quant._CHUNK_VALUES
    try:
        quant._CHUNK_VALUES = 100          # forces several chunks (of one row each)
        x = _data((13, 96), 3)
        assert np.array_equal(quantize_q40(x), g_quantize(x, GT.Q4_0))
        assert np.array_equal(quantize_q80(x), g_quantize(x, GT.Q8_0))
        assert np.array_equal(dequantize_q40(quantize_q40(x)), g_dequantize(g_quantize(x, GT.Q4_0), GT.Q4_0))
    finally:
        quant._CHUNK_VALUES = old


@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (33, 160), (130, 2048), (3, 4096)])
def test_q40matrix(shape):
    x = _data(shape, 4)
    raw = quantize_q40(x)
    for layout in ("rows", "slab"):
        assert np.array_equal(Q40Matrix.from_blocks(raw, layout).to_blocks(), raw)
    m = Q40Matrix.from_blocks(raw)
    assert (m.rows, m.cols) == shape
    assert m.nbytes > 0 and m.nbytes >= raw.nbytes * 16 // 18
    assert np.array_equal(m.dequantize(), dequantize_q40(raw))
    import pickle
    m2 = pickle.loads(pickle.dumps(m))
    assert np.array_equal(m2.dequantize(), m.dequantize())
