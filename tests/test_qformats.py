"""Q41 (GGML Q4_1 kept at run time) against the gguf package's own dequantiser."""
import numpy as np
import pytest

from dllama_mpi import kernels
from dllama_mpi.quant import (Q41Matrix, add_offsets, block_sums, dequantize_q41, dequantize_q80_parts, quantize_q41,
                              quantize_q80_parts)


@pytest.mark.parametrize("rows,cols", [(1, 32), (7, 96), (33, 2080)])
def test_q41_matrix_dequantises_like_gguf(rows, cols):
    w = np.random.default_rng(rows).standard_normal((rows, cols)).astype(np.float32) + 0.3
    raw = quantize_q41(w)
    m = Q41Matrix.from_blocks(raw)
    np.testing.assert_allclose(m.dequantize(), dequantize_q41(raw), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t", [1, 5])
def test_q41_matmul_equals_dequantised_product(t):
    rng = np.random.default_rng(t)
    w = rng.standard_normal((40, 160)).astype(np.float32) + 0.5  # offsets matter
    x = rng.standard_normal((t, 160)).astype(np.float32)
    m = Q41Matrix.from_blocks(quantize_q41(w))
    xq, xd = quantize_q80_parts(x)
    out = np.empty((t, 40), np.float32)
    kernels.matmul_q80_q40(out, xq, xd, m.q40)
    add_offsets(out, block_sums(xq, xd), m)
    ref = dequantize_q80_parts(xq, xd) @ m.dequantize().T
    scale = np.abs(dequantize_q80_parts(xq, xd)) @ np.abs(m.dequantize()).T
    assert np.all(np.abs(out - ref) <= 1e-5 * scale + 1e-6)


@pytest.mark.parametrize("rows,cols", [(1, 32), (17, 96), (33, 576)])
def test_row_tile_round_trips(rows, cols):
    from dllama_mpi.quant import Q80Matrix, dequantize_q80, quantize_q80
    w = np.random.default_rng(rows).standard_normal((rows, cols)).astype(np.float32)
    raw = quantize_q41(w)
    m = Q41Matrix.from_blocks(raw)
    assert np.array_equal(m.to_blocks(), raw)
    assert m.nbytes == (rows + 15) // 16 * 16 * cols // 32 * 20
    raw8 = quantize_q80(w)
    m8 = Q80Matrix.from_blocks(raw8)
    assert np.array_equal(m8.to_blocks(), raw8)
    assert np.array_equal(m8.dequantize(), dequantize_q80(raw8))
    import pickle
    assert np.array_equal(pickle.loads(pickle.dumps(m8)).to_blocks(), raw8)
    assert np.array_equal(pickle.loads(pickle.dumps(m)).to_blocks(), raw)
    with pytest.raises(ValueError, match="nb\\*34"):
        Q80Matrix.from_blocks(np.zeros((2, 20), np.uint8))


def test_bad_blocks_rejected():
    with pytest.raises(ValueError, match="nb\\*20"):
        Q41Matrix.from_blocks(np.zeros((2, 18), np.uint8))
