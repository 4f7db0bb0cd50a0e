"""The GGUF writer, checked against an independent reader (transformers' GGUF loader).

Random tiny Hugging Face Llama models with awkward shapes are written to GGUF and loaded back by
``transformers`` (which undoes llama.cpp's q/k permutation itself); the logits must match the
original model.  For quantised files the reference is the original model with its matrices
round-tripped through the same quantisation (``gguf.quants``), so the tolerance stays tight.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import gguf
from gguf.quants import dequantize, quantize

from dllama_mpi.formats.base import llama3_rope_factors
from dllama_mpi.testing import (
    WEIGHT_TYPES,
    byte_bpe_vocab,
    permute_qk,
    random_llama_tensors,
    unpermute_qk,
    write_llama_gguf,
)
from dllama_mpi.tokenizer import bytes_to_unicode

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

# (name, LlamaConfig kwargs)
SHAPES = [
    ("d96_h3_kv1", dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1, intermediate_size=160,
                        num_hidden_layers=2, vocab_size=320, rope_theta=10000.0, rms_norm_eps=1e-5)),
    ("d64_h4_kv2_tied", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                             num_hidden_layers=2, vocab_size=300, tie_word_embeddings=True, rope_theta=50000.0,
                             rms_norm_eps=1e-6)),
    ("hd32_h6_kv3", dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, head_dim=32,
                         intermediate_size=224, num_hidden_layers=2, vocab_size=352, rope_theta=100000.0,
                         rms_norm_eps=1e-5)),
]


def _hf_model(cfg_kwargs, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(max_position_embeddings=256, **cfg_kwargs)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    # the default init leaves norms at exactly 1: perturb them so a norm mix-up would show
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05)
    return model


def _state(model):
    sd = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def _write(model, path, weight_type, tokenizer="bytes"):
    c = model.config
    head_dim = getattr(c, "head_dim", None)
    rope_theta = c.rope_parameters["rope_theta"]
    return write_llama_gguf(
        path, dim=c.hidden_size, hidden_dim=c.intermediate_size, n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads, vocab_size=c.vocab_size,
        context_length=c.max_position_embeddings, rope_theta=rope_theta, norm_eps=c.rms_norm_eps,
        head_dim=head_dim, tensors=_state(model), weight_type=weight_type, tokenizer=tokenizer)


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _load_gguf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _roundtrip_reference(model, weight_type):
    """The original model with every matrix passed through the file's quantisation."""
    qt = WEIGHT_TYPES[weight_type]
    ref = transformers.LlamaForCausalLM(model.config).float().eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if p.ndim == 2:
                a = p.detach().numpy()
                p.copy_(torch.from_numpy(dequantize(quantize(a, qt), qt).reshape(a.shape).astype(np.float32)))
    return ref


@pytest.mark.parametrize("name,cfg", SHAPES, ids=[s[0] for s in SHAPES])
def test_f32_logits_match_transformers(tmp_path, name, cfg):
    model = _hf_model(cfg)
    path = _write(model, tmp_path / f"{name}.gguf", "f32")
    loaded = _load_gguf_model(path)
    assert loaded.config.tie_word_embeddings == bool(cfg.get("tie_word_embeddings", False))
    assert loaded.config.head_dim == model.config.head_dim
    assert loaded.config.rope_parameters["rope_theta"] == pytest.approx(model.config.rope_parameters["rope_theta"])
    ids = np.random.default_rng(1).integers(0, cfg["vocab_size"], size=13).tolist()
    want, got = _logits(model, ids), _logits(loaded, ids)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("weight_type", ["f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("name,cfg", [SHAPES[0], SHAPES[2]], ids=[SHAPES[0][0], SHAPES[2][0]])
def test_quantised_logits_match_roundtripped_reference(tmp_path, name, cfg, weight_type):
    model = _hf_model(cfg)
    path = _write(model, tmp_path / f"{name}-{weight_type}.gguf", weight_type)
    r = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["token_embd.weight"] == WEIGHT_TYPES[weight_type]
    assert types["blk.0.attn_q.weight"] == WEIGHT_TYPES[weight_type]
    assert types["blk.1.ffn_norm.weight"] == gguf.GGMLQuantizationType.F32
    loaded = _load_gguf_model(path)
    ref = _roundtrip_reference(model, weight_type)
    ids = np.random.default_rng(2).integers(0, cfg["vocab_size"], size=11).tolist()
    want, got, orig = _logits(ref, ids), _logits(loaded, ids), _logits(model, ids)
    scale = np.abs(want).max()
    rel = np.abs(got - want).max() / scale
    quant_err = np.abs(orig - want).max() / scale  # what the quantisation itself changes
    assert quant_err > 0
    assert rel < 1e-5 and rel < quant_err / 100, (rel, quant_err)


def test_bytes_tokenizer_roundtrip_in_transformers(tmp_path):
    cfg = dict(SHAPES[1][1], vocab_size=1024)
    model = _hf_model(cfg)
    path = _write(model, tmp_path / "tok.gguf", "f32")
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    # transformers' GPT2Tokenizer adds its default "<|endoftext|>" on top of the file's vocabulary
    assert tok.vocab_size == 1024 and len(tok) in (1024, 1025)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 1023]) == ["<unk>", "<s>", "</s>", "Ā", byte_bpe_vocab(1024)[0][1023]]
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"
    text = "Hello world, the naïve café costs 3.50€ — 日本語テキスト 🙂\nnew line\ttab"
    ids = tok.encode(text)
    assert ids[0] == 1  # add_bos_token
    assert max(ids) < 1024
    assert tok.decode(ids, skip_special_tokens=True) == text
    # merges are used: common words become single tokens
    assert tok.convert_ids_to_tokens(tok.encode(" the", add_special_tokens=False)) == ["Ġthe"]
    assert len(tok.encode(" the model", add_special_tokens=False)) < len(" the model")
    # chat template is usable
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<s>user\nhi</s>\n<s>assistant\n"


def test_byte_vocab_layout():
    tokens, types, merges = byte_bpe_vocab(800)
    assert len(tokens) == len(types) == 800
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and types[:3] == [3, 3, 3]
    b2u = bytes_to_unicode()
    assert tokens[3:259] == [b2u[b] for b in range(256)] and set(types[3:259]) == {1}
    assert len(set(tokens)) == 800
    vocab = set(tokens)
    for m in merges:
        a, b = m.split(" ")
        assert a in vocab and b in vocab and a + b in vocab
    assert tokens[-1].startswith("<unused_") and types[-1] == 5
    assert byte_bpe_vocab(800) == (tokens, types, merges)  # deterministic
    t300, ty300, m300 = byte_bpe_vocab(300)  # merges limited by the room left
    assert len(t300) == 300 and len(m300) >= 41 and set(ty300[259:]) == {1}
    t259, _, m259 = byte_bpe_vocab(259)
    assert len(t259) == 259 and m259 == []
    with pytest.raises(ValueError):
        byte_bpe_vocab(258)


def test_copy_tokenizer_and_no_tokenizer(tmp_path):
    cfg = dict(dim=64, hidden_dim=96, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=512)
    ts = random_llama_tensors(**cfg)
    a = write_llama_gguf(tmp_path / "a.gguf", context_length=64, tensors=ts, **cfg)
    b = write_llama_gguf(tmp_path / "b.gguf", context_length=64, tensors=ts, tokenizer=a, **cfg)
    c = write_llama_gguf(tmp_path / "c.gguf", context_length=64, tensors=ts, tokenizer=None, **cfg)
    ra, rb, rc = (gguf.GGUFReader(p) for p in (a, b, c))
    tok_a = {k: (f.types, f.contents()) for k, f in ra.fields.items() if k.startswith("tokenizer.")}
    tok_b = {k: (f.types, f.contents()) for k, f in rb.fields.items() if k.startswith("tokenizer.")}
    assert tok_a and tok_a == tok_b
    assert not any(k.startswith("tokenizer.") for k in rc.fields)
    other = dict(cfg, vocab_size=320)
    with pytest.raises(ValueError):
        write_llama_gguf(tmp_path / "d.gguf", context_length=64, tensors=random_llama_tensors(**other),
                         tokenizer=a, **other)
    assert not (tmp_path / "d.gguf").exists()
    assert sorted(os.listdir(tmp_path)) == ["a.gguf", "b.gguf", "c.gguf"]  # no temp files left


def test_permutation_matches_interleaved_pairs():
    hd, n_heads, cols = 8, 3, 5
    w = np.arange(n_heads * hd * cols, dtype=np.float32).reshape(n_heads * hd, cols)
    p = permute_qk(w, n_heads)
    for h in range(n_heads):
        for i in range(hd // 2):
            np.testing.assert_array_equal(p[h * hd + 2 * i], w[h * hd + i])
            np.testing.assert_array_equal(p[h * hd + 2 * i + 1], w[h * hd + i + hd // 2])
    np.testing.assert_array_equal(unpermute_qk(p, n_heads), w)


@pytest.mark.parametrize("weight_type", ["f32", "q4_0"])
def test_random_tensors_written_exactly(tmp_path, weight_type):
    cfg = dict(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=300)
    ts = random_llama_tensors(**cfg, seed=7)
    assert set(ts) == set(random_llama_tensors(**cfg, seed=7, tied=True)) | {"lm_head.weight"}
    np.testing.assert_array_equal(ts["model.layers.1.mlp.up_proj.weight"],
                                  random_llama_tensors(**cfg, seed=7)["model.layers.1.mlp.up_proj.weight"])
    assert not np.array_equal(ts["model.norm.weight"], random_llama_tensors(**cfg, seed=8)["model.norm.weight"])
    path = write_llama_gguf(tmp_path / "r.gguf", context_length=64, tensors=ts, weight_type=weight_type, **cfg)
    qt = WEIGHT_TYPES[weight_type]
    r = gguf.GGUFReader(path)
    got = {t.name: t for t in r.tensors}
    assert list(got)[:3] == ["token_embd.weight", "blk.0.attn_norm.weight", "blk.0.attn_q.weight"]
    assert r.fields["general.file_type"].contents() == {"f32": 0, "q4_0": 2}[weight_type]
    assert r.fields["llama.rope.dimension_count"].contents() == 16
    assert "llama.attention.key_length" not in r.fields
    for hf, gg, heads in [("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", 4),
                          ("model.layers.1.self_attn.k_proj.weight", "blk.1.attn_k.weight", 1),
                          ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight", 0),
                          ("lm_head.weight", "output.weight", 0),
                          ("model.embed_tokens.weight", "token_embd.weight", 0)]:
        a = ts[hf]
        if heads:
            a = permute_qk(a, heads)
        t = got[gg]
        assert t.tensor_type == qt
        np.testing.assert_array_equal(np.asarray(t.data).reshape(-1).view(np.uint8),
                                      quantize(a, qt).reshape(-1).view(np.uint8))
    norm = got["output_norm.weight"]
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(np.asarray(norm.data), ts["model.norm.weight"])


def test_head_dim_and_rope_scaling_metadata(tmp_path):
    cfg = dict(dim=64, hidden_dim=96, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=300, head_dim=32)
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
    path = write_llama_gguf(tmp_path / "s.gguf", context_length=512, rope_theta=500000.0,
                            tensors=random_llama_tensors(**cfg), rope_scaling=rs, **cfg)
    r = gguf.GGUFReader(path)
    assert r.fields["llama.attention.key_length"].contents() == 32
    assert r.fields["llama.attention.value_length"].contents() == 32
    assert r.fields["llama.rope.dimension_count"].contents() == 32
    assert r.tensors[0].name == "rope_freqs.weight"
    factors = np.asarray(r.tensors[0].data, dtype=np.float32)
    np.testing.assert_array_equal(factors, llama3_rope_factors(rs, head_dim=32, rope_theta=500000.0))
    # independent check: transformers' llama3 inv_freq == plain inv_freq / factors
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf_cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      max_position_embeddings=512,
                                      rope_parameters=dict(rs, rope_theta=500000.0))
    inv_scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    plain = 1.0 / (500000.0 ** (np.arange(0, 32, 2, dtype=np.float64) / 32))
    np.testing.assert_allclose(inv_scaled.double().numpy(), plain / factors, rtol=1e-5)
    assert factors[0] == 1.0 and factors[-1] == 8.0 and ((factors > 1) & (factors < 8)).any()

    lin = write_llama_gguf(tmp_path / "l.gguf", context_length=512, tensors=random_llama_tensors(**cfg),
                           rope_scaling={"type": "linear", "factor": 2.0}, tokenizer=None, **cfg)
    r = gguf.GGUFReader(lin)
    assert r.fields["llama.rope.scaling.type"].contents() == "linear"
    assert r.fields["llama.rope.scaling.factor"].contents() == 2.0
    assert all(t.name != "rope_freqs.weight" for t in r.tensors)


def test_rejects_bad_input(tmp_path):
    cfg = dict(dim=64, hidden_dim=96, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=300)
    ts = dict(random_llama_tensors(**cfg))
    with pytest.raises(ValueError, match="weight_type"):
        write_llama_gguf(tmp_path / "x.gguf", context_length=8, tensors=ts, weight_type="q3_k", **cfg)
    bad = dict(ts)
    del bad["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="missing"):
        write_llama_gguf(tmp_path / "x.gguf", context_length=8, tensors=bad, **cfg)
    bad = dict(ts)
    bad["model.layers.0.mlp.up_proj.weight"] = bad["model.layers.0.mlp.up_proj.weight"][:, :32]
    with pytest.raises(ValueError, match="shape"):
        write_llama_gguf(tmp_path / "x.gguf", context_length=8, tensors=bad, **cfg)
    assert not (tmp_path / "x.gguf").exists()
    assert os.listdir(tmp_path) == []
