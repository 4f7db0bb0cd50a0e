"""Mixture of experts (Qwen3-MoE, Mixtral) in one process: random tiny models of
transformers' classes, as GGUF (llama.cpp's ffn_*_exps / ffn_gate_inp) and as HF folders,
against transformers; the quantised experts against their numpy twin; memory and info count
every expert. tests/mpi/test_moe_parity.py runs them on N ranks."""
import numpy as np
import pytest

from dllama_mpi.comm import SerialComm
from tiny import (MOE_SHAPES, hf_moe_greedy, hf_moe_logits, hf_moe_model, our_greedy, our_logits,
                  save_hf_moe, tolerance, write_moe_gguf)

IDS = [1, 17, 42, 99, 3, 150, 7, 64, 5, 180, 2, 33]


def _file(tmp_path, shape, form, weight_type="f32"):
    if form == "hf":
        return save_hf_moe(str(tmp_path / shape), shape)
    return write_moe_gguf(str(tmp_path / f"{shape}-{weight_type}.gguf"), shape, weight_type)


@pytest.mark.parametrize("form", ["gguf", "hf"])
@pytest.mark.parametrize("shape", sorted(MOE_SHAPES))
def test_logits_match_transformers(tmp_path, shape, form):
    ref = hf_moe_logits(shape, IDS)
    ours = our_logits(SerialComm(), _file(tmp_path, shape, form), IDS)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=tolerance(ref))


@pytest.mark.parametrize("shape", sorted(MOE_SHAPES))
def test_greedy_decode_matches_transformers(tmp_path, shape):
    """Decode routes one token at a time (the T=1 path) through the KV cache."""
    path = _file(tmp_path, shape, "gguf")
    assert our_greedy(SerialComm(), path, IDS[:4], 16) == hf_moe_greedy(shape, IDS[:4], 16)


def test_unnormalised_top_k_weights(tmp_path):
    """Qwen3-MoE with norm_topk_prob false: the chosen experts' softmax weights as they are."""
    ref = hf_moe_logits("qwen3moe", IDS, norm_topk_prob=False)
    path = save_hf_moe(str(tmp_path / "m"), "qwen3moe", norm_topk_prob=False)
    from dllama_mpi.formats import open_model
    assert open_model(path).config.expert_norm is False
    ours = our_logits(SerialComm(), path, IDS)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=tolerance(ref))
    assert np.abs(ours - hf_moe_logits("qwen3moe", IDS)).max() > 10 * tolerance(ref)


@pytest.mark.parametrize("weight_type,runtime", [("q4_0", "q40"), ("q8_0", "q80")])
def test_quantised_experts_match_their_numpy_twin(tmp_path, monkeypatch, weight_type, runtime):
    from dllama_mpi import model as model_module
    from dllama_mpi.quant import dequantize_q80_parts, quantize_q80_parts
    path = _file(tmp_path, "qwen3moe", "gguf", weight_type)
    q = our_logits(SerialComm(), path, IDS, weights=runtime, wire="q80")
    f32_matmul = model_module.Transformer._matmul

    def q80_rounded_matmul(self, out, inp, w):
        rounded = model_module._Input(dequantize_q80_parts(*quantize_q80_parts(inp.x)))
        return f32_matmul(self, out, rounded, w)

    monkeypatch.setattr(model_module.Transformer, "_matmul", q80_rounded_matmul)
    twin = our_logits(SerialComm(), path, IDS, weights="f32")
    diff = np.linalg.norm(q - twin) / np.linalg.norm(twin)
    assert diff < 5e-3, diff
    assert (q.argmax(-1) == twin.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("weights", ["f32", "q40"])
def test_memory_counts_every_expert(tmp_path, weights):
    from dllama_mpi import memory
    from dllama_mpi.config import RunConfig
    from dllama_mpi.runtime.startup import start
    path = _file(tmp_path, "mixtral", "gguf", "q4_0" if weights == "q40" else "f32")
    s = start(SerialComm(), path, RunConfig(weights_float_type=weights, max_seq_len=16,
                                            nthreads=1), want_tokenizer=False)
    held = s.engine.model.w.nbytes()
    assert memory.per_rank(s.config, s.run, 1)[0].weights == held
    c = s.config
    if weights == "f32":
        per_layer = (c.q_dim + 2 * c.kv_dim) * c.dim + c.dim * c.q_dim \
            + c.n_experts * 3 * c.hidden_dim * c.dim + c.n_experts * c.dim + 2 * c.dim
        assert held == 4 * (c.n_layers * per_layer + c.dim + c.vocab_size * c.dim)


@pytest.mark.parametrize("weights", ["f32", "q40"])
def test_read_bytes_count_the_chosen_experts_only(tmp_path, weights):
    """What a decode step streams (the planner's and the bench's roofline): everything held
    but the experts no row chose; with many rows, nearly every expert."""
    from dllama_mpi import memory
    from dllama_mpi.config import RunConfig
    from dllama_mpi.runtime.startup import start
    from dllama_mpi.shard import plan
    path = _file(tmp_path, "mixtral", "gguf", "q4_0" if weights == "q40" else "f32")
    s = start(SerialComm(), path, RunConfig(weights_float_type=weights, max_seq_len=16,
                                            nthreads=1), want_tokenizer=False)
    c, layers = s.config, s.engine.model.w.layers
    held = s.engine.model.w.nbytes()
    one_expert = sum(m.nbytes() if hasattr(m, "nbytes") and callable(m.nbytes) else m.nbytes
                     for m in layers[0].experts[0]) * c.n_layers
    p = plan(c, 0, 1)
    unread = c.n_experts - c.n_experts_used
    assert memory.read_bytes(c, p, s.run, rows=1) == held - unread * one_expert
    many = memory.read_bytes(c, p, s.run, rows=64)
    assert held - one_expert < many <= held


@pytest.mark.parametrize("form", ["gguf", "hf"])
def test_info_counts_the_experts_parameters(tmp_path, capsys, form):
    from dllama_mpi.apps.info import print_info
    path = _file(tmp_path, "qwen3moe", form)
    assert print_info(path, 3) == 0
    out = capsys.readouterr().out
    params = int(out.split("parameters: ")[1].split()[0].replace(",", ""))
    assert params == sum(p.numel() for p in hf_moe_model("qwen3moe").parameters())
    assert "n_experts: 4" in out and "n_experts_used: 2" in out


def test_conversions(tmp_path):
    """To our .h5 store: the same logits; to a Distributed Llama .m: a clear refusal."""
    from dllama_mpi.apps.convert import convert
    from dllama_mpi.errors import DllamaError
    path = _file(tmp_path, "qwen3moe", "gguf")
    h5 = convert(path, str(tmp_path / "m.h5"), "f32", progress=False)[0]
    np.testing.assert_array_equal(our_logits(SerialComm(), h5, IDS),
                                  our_logits(SerialComm(), path, IDS))
    with pytest.raises(DllamaError, match="mixture-of-experts"):
        convert(path, str(tmp_path / "m.m"), "f32", to="dllama", progress=False)


def _route_numpy(xb, router, k, normalise):
    """The routing as transformers writes it (softmax, top-k, renormalise), in numpy."""
    logits = (xb.astype(np.float64) @ router.T.astype(np.float64))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    top = np.argsort(-p, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(p, top, axis=1)
    if normalise:
        w = w / w.sum(axis=1, keepdims=True)
    return top, w


@pytest.mark.parametrize("normalise", [True, False])
@pytest.mark.parametrize("n,k", [(8, 2), (4, 1), (16, 4), (3, 3)])
def test_route_kernel_matches_numpy(n, k, normalise):
    from dllama_mpi import kernels
    rng = np.random.default_rng(n * 10 + k)
    xb = rng.standard_normal((7, 96)).astype(np.float32)
    router = rng.standard_normal((n, 96)).astype(np.float32)
    top, w = kernels.route(xb, router, k, normalise)
    ref_top, ref_w = _route_numpy(xb, router, k, normalise)
    np.testing.assert_array_equal(top, ref_top)
    np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-7)


def test_route_ties_take_the_lowest_index():
    from dllama_mpi import kernels
    router = np.zeros((6, 32), np.float32)
    router[4] = 1.0
    top, w = kernels.route(np.ones((1, 32), np.float32), router, 3, False)
    assert top.tolist() == [[4, 0, 1]]
    np.testing.assert_allclose(w[0, 1], w[0, 2])


def test_route_rejects_bad_shapes():
    from dllama_mpi import kernels
    with pytest.raises(ValueError):
        kernels.route(np.ones((1, 32), np.float32), np.ones((4, 16), np.float32), 2, True)
    with pytest.raises(ValueError):
        kernels.route(np.ones((1, 32), np.float32), np.ones((4, 32), np.float32), 5, True)
