"""K-quant GGUFs (quant/kquants.py): our test quantisers lay blocks out as GGML does, Q4_K
becomes Q41 with its nibbles kept (exact where its factors are f16 values, within 2^-11 of them
elsewhere), the other types become Q80 through the gguf package's dequantisers, a rank's column
band cuts super-blocks right, and a Q4_K_M file runs each matrix in its own type: runtime
matrices, memory, and whole-model logits against transformers and the runtime's numpy twin."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from dllama_mpi.comm import SerialComm
from dllama_mpi.formats.base import Tensor
from dllama_mpi.quant import (Q41Matrix, Q80Matrix, dequantize_q40, dequantize_q41,
                              dequantize_q80, quantize_q40, quantize_q41, quantize_q80)
from dllama_mpi.quant.kquants import q4k_exact_fraction, q4k_factors, q4k_to_q41, to_q80
from dllama_mpi.shard import Range
from dllama_mpi.testing.kquants import QUANTIZERS, random_blocks
from tiny import dequantised_hf_logits, our_logits, tolerance, write_tiny_gguf

IDS = [1, 17, 42, 99, 3, 150, 7, 64, 5, 180, 2, 33]


def _weights(rows=24, cols=1280, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, cols)) * 0.02 + 0.003).astype(np.float32)


@pytest.mark.parametrize("type_name,rel_rms", [("Q4_K", 0.12), ("Q5_K", 0.06), ("Q6_K", 0.03)])
def test_our_quantisers_write_blocks_gguf_reads(type_name, rel_rms):
    x = _weights()
    raw = QUANTIZERS[type_name](x)
    assert raw.shape == (24, 1280 // 256 * {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[type_name])
    y = dequantize(raw, QT[type_name])
    assert np.sqrt(((y - x) ** 2).mean() / (x ** 2).mean()) < rel_rms
    r = random_blocks(type_name, 8, 512, seed=3)
    assert np.isfinite(dequantize(r, QT[type_name])).all()


def test_q4k_to_q41_is_exact_where_the_factors_are_f16_values():
    """d and dmin powers of two: every d*sc and dmin*m fits an f16, so the Q41 blocks
    dequantise to the very values of the Q4_K blocks; the nibbles are the same bits."""
    raw = random_blocks("Q4_K", 16, 1024, seed=5).reshape(-1, 144)
    raw[:, 0:2] = np.float16(2.0 ** -10).reshape(1, 1).view(np.uint8)
    raw[:, 2:4] = np.float16(2.0 ** -12).reshape(1, 1).view(np.uint8)
    raw = raw.reshape(16, -1)
    assert q4k_exact_fraction(raw) == 1.0
    q41 = q4k_to_q41(raw)
    np.testing.assert_array_equal(dequantize_q41(q41), dequantize(raw, QT.Q4_K))


@pytest.mark.parametrize("source", ["random", "quantised"])
def test_q4k_to_q41_error_is_the_f16_rounding_of_the_factors(source):
    raw = random_blocks("Q4_K", 32, 1024, seed=7) if source == "random" else \
        QUANTIZERS["Q4_K"](_weights(32, 1024))
    ref = dequantize(raw, QT.Q4_K)
    got = dequantize_q41(q4k_to_q41(raw))
    scale, offset = q4k_factors(raw)
    bound = np.repeat(2.0 ** -11 * (15 * np.abs(scale) + np.abs(offset)), 32, axis=1)
    err = np.abs(got - ref)
    assert np.all(err <= bound * (1 + 1e-6) + 1e-12)
    # exact sub-blocks are exact; in a real-like tensor the loss is ~1 % of Q4_K's own error
    d16 = scale.astype(np.float16).astype(np.float32) == scale
    m16 = offset.astype(np.float16).astype(np.float32) == offset
    exact = np.repeat(d16 & m16, 32, axis=1)
    assert np.all(err[exact] == 0)
    if source == "quantised":
        own = np.sqrt(((ref - _weights(32, 1024)) ** 2).mean())
        assert np.sqrt((err ** 2).mean()) < 0.02 * own


@pytest.mark.parametrize("type_name", ["Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0"])
def test_other_types_become_q80_of_the_reference_values(type_name):
    x = _weights(8, 512)
    raw = QUANTIZERS[type_name](x) if type_name in QUANTIZERS else quantize(x, QT[type_name])
    ref = dequantize(raw, QT[type_name])
    q80 = to_q80(raw, type_name)
    np.testing.assert_array_equal(q80, quantize_q80(ref))
    # one Q8_0 rounding: at most half a step d = max|w|/127 per 32 values, plus up to 127
    # times the f16 rounding of d (2^-11 d)
    step = np.repeat(np.abs(ref).reshape(8, -1, 32).max(-1) / 127, 32, axis=1)
    assert np.all(np.abs(dequantize_q80(q80) - ref) <= (0.5 + 127 * 2.0 ** -11) * step + 1e-9)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q6_K", "Q5_0", "Q8_0", "Q4_0"])
@pytest.mark.parametrize("target", ["q41", "q80", "q40", "f32"])
def test_column_bands_cut_super_blocks_like_whole_rows(type_name, target):
    """A rank's band of wo / w2 columns (32-aligned, not 256-aligned) converted alone
    equals the same band cut from the whole rows' conversion."""
    from dllama_mpi.loading import convert_slice
    x = _weights(6, 1280)
    raw = QUANTIZERS[type_name](x) if type_name in QUANTIZERS else quantize(x, QT[type_name])
    t = Tensor("w", type_name, x.shape, raw)
    whole = convert_slice(t, "out:ffn", Range(0, 6), target)
    per = {"q41": 20, "q80": 34, "q40": 18}.get(target)
    for band in (Range(0, 448), Range(448, 864), Range(864, 1280), Range(96, 192)):
        got = convert_slice(t, "in:ffn", band, target)
        want = whole[:, band.start // 32 * per:band.stop // 32 * per] if per else \
            whole[:, band.start:band.stop]
        np.testing.assert_array_equal(got, want)


def test_q4_k_m_file_keeps_each_matrix_in_its_own_type(tmp_path):
    """llama.cpp's Q4_K_M mix: Q4_K, with Q6_K wv and w2 in layer 1 and a Q6_K output; the
    layer-1 q|k|v stack is Q41 (wq|wk) + Q80 (wv), each part the file's blocks converted."""
    from dllama_mpi.config import RunConfig
    from dllama_mpi.model import SplitMatrix
    from dllama_mpi.runtime.startup import start
    path = write_tiny_gguf(str(tmp_path / "m.gguf"), "k8h", "q4_k_m")
    s = start(SerialComm(), path, RunConfig(max_seq_len=16, nthreads=1), want_tokenizer=False)
    assert s.run.weights_float_type == "mixed" and s.run.output_float_type == "q80"
    assert s.run.tensor_types["layers.1.wv"] == "q80" and s.run.tensor_types["layers.0.wv"] == "q41"
    from dllama_mpi.formats import open_model
    g = open_model(path)
    w = s.engine.model.w
    l0, l1 = w.layers
    assert isinstance(l0.wqkv, Q41Matrix) and isinstance(l0.w2, Q41Matrix)
    assert isinstance(l1.wqkv, SplitMatrix) and isinstance(l1.w2, Q80Matrix)
    assert isinstance(l1.w13, Q41Matrix) and isinstance(w.wcls, Q80Matrix)
    qk, v = l1.wqkv.parts
    assert isinstance(qk, Q41Matrix) and isinstance(v, Q80Matrix)
    file_qk = np.concatenate([np.asarray(g.tensor(f"layers.1.{n}").data) for n in ("wq", "wk")])
    np.testing.assert_array_equal(qk.to_blocks(), q4k_to_q41(file_qk))
    np.testing.assert_array_equal(v.to_blocks(), to_q80(np.asarray(g.tensor("layers.1.wv").data),
                                                        "Q6_K"))
    np.testing.assert_array_equal(l1.w2.to_blocks(),
                                  to_q80(np.asarray(g.tensor("layers.1.w2").data), "Q6_K"))


@pytest.mark.parametrize("shape", ["k8h", "k8h_fallback"])
def test_f32_run_of_a_k_quant_file_matches_transformers(tmp_path, shape):
    """Read at f32, a Q4_K_M file is its gguf-dequantised weights: transformers on those."""
    path = write_tiny_gguf(str(tmp_path / "m.gguf"), shape, "q4_k_m")
    ref = dequantised_hf_logits(path, shape, IDS)
    ours = our_logits(SerialComm(), path, IDS, weights="f32")
    np.testing.assert_allclose(ours, ref, rtol=0, atol=tolerance(ref))


_DEQUANT = {"q40": dequantize_q40, "q41": dequantize_q41, "q80": dequantize_q80}


@pytest.mark.parametrize("shape", ["k8h", "k8h_fallback"])
def test_mixed_runtime_matches_its_numpy_twin(tmp_path, monkeypatch, shape):
    """A Q4_K_M file run two ways: every matrix in its own runtime type (Q41 / Q80 kernels),
    and the F32 path on those runtime matrices' values with every matmul input rounded
    through Q80 in numpy: the same arithmetic but for f32 summation order. The mixed run also
    stays close to the f32 run on the file's own values (the loss of the conversions and of
    Q80 activations) and to transformers on them."""
    from dllama_mpi import loading
    from dllama_mpi import model as model_module
    from dllama_mpi.config import RUNTIME_TYPE
    from dllama_mpi.quant import dequantize_q80_parts, quantize_q80_parts
    path = write_tiny_gguf(str(tmp_path / "m.gguf"), shape, "q4_k_m")
    mixed = our_logits(SerialComm(), path, IDS, weights="auto", wire="q80")
    plain = our_logits(SerialComm(), path, IDS, weights="f32")
    convert = loading.convert_slice

    def runtime_values(tensor, kind, rng, target):
        if target == "f32" and kind.startswith(("out:", "in:")):
            natural = RUNTIME_TYPE[tensor.type]
            natural = "q80" if natural == "f32" else natural
            return _DEQUANT[natural](convert(tensor, kind, rng, natural))
        return convert(tensor, kind, rng, target)

    f32_matmul = model_module.Transformer._matmul

    def q80_rounded_matmul(self, out, inp, w):
        rounded = model_module._Input(dequantize_q80_parts(*quantize_q80_parts(inp.x)))
        return f32_matmul(self, out, rounded, w)

    monkeypatch.setattr(loading, "convert_slice", runtime_values)
    monkeypatch.setattr(model_module.Transformer, "_matmul", q80_rounded_matmul)
    twin = our_logits(SerialComm(), path, IDS, weights="f32")
    diff = np.linalg.norm(mixed - twin) / np.linalg.norm(twin)
    assert diff < 5e-3, diff
    assert (mixed.argmax(-1) == twin.argmax(-1)).all()
    assert np.linalg.norm(mixed - plain) / np.linalg.norm(plain) < 0.1


def test_info_counts_tensor_types_and_bytes(tmp_path, capsys):
    from dllama_mpi.apps.info import print_info
    path = write_tiny_gguf(str(tmp_path / "m.gguf"), "k8h", "q4_k_m")
    assert print_info(path, 3) == 0
    out = capsys.readouterr().out
    assert "runs as mixed (q41 x12, q80 x2)" in out
    # 2 x (wq wk wv wo w1 w2 w3) + embedding: Q4_K; layer 1's wv and w2, output: Q6_K
    assert "Q4_K x13" in out and "Q6_K x3" in out and "F32 x5" in out
