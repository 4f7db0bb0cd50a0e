"""Distributed Llama .m / .t files (formats/dllama.py): against files built by hand from the
spec (Distributed Llama's src/llm.cpp and src/tokenizer.cpp), round trips, and every malformation."""
import os
import struct

import numpy as np
import pytest

from dllama_mpi.comm import SerialComm
from dllama_mpi.errors import DllamaError
from dllama_mpi.formats import open_model
from dllama_mpi.formats.dllama import DllamaModel, write_dllama_m, write_dllama_t
from dllama_mpi.tokenizer import Tokenizer, read_dllama_t
from test_formats_hf import IDS, save_hf
from tiny import SHAPES, hf_logits, hf_model, our_logits, tolerance, write_tiny_gguf


# --------------------------------------------------------------------- the spec, by hand

def q40_by_hand(x: np.ndarray) -> bytes:
    """The notes' Q40: m = signed value of largest magnitude, d = m / -8,
    q = clamp(trunc(x/d + 8.5), 0, 15); fp16 d then byte j = q[j] | q[j+16] << 4."""
    blocks = np.asarray(x, np.float32).reshape(-1, 32)
    m = blocks[np.arange(len(blocks)), np.argmax(np.abs(blocks), axis=1)]
    d = m / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.clip(np.trunc(blocks * inv[:, None] + np.float32(8.5)), 0, 15).astype(np.uint8)
    out = np.empty((len(blocks), 18), np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
    return out.tobytes()


def interleave_by_hand(w: np.ndarray, heads: int) -> np.ndarray:
    hd = w.shape[0] // heads
    out = np.empty_like(w)
    for h in range(heads):
        for i in range(hd // 2):
            out[h * hd + 2 * i] = w[h * hd + i]
            out[h * hd + 2 * i + 1] = w[h * hd + i + hd // 2]
    return out


def hand_m(path, shape="q40_9h", wtype=2, extra_keys=(), cut=0, append=b""):
    """A .m file written from the spec with struct, from the tiny HF model's weights."""
    s = dict(SHAPES[shape])
    sd = {k: v.detach().numpy() for k, v in hf_model(shape).state_dict().items()}
    hd = s.get("head_dim", s["dim"] // s["n_heads"])
    keys = [(0, 0), (1, 0xABCD00), (11, 1), (2, s["dim"]), (3, s["hidden_dim"]),
            (4, s["n_layers"]), (5, s["n_heads"]), (6, s["n_kv_heads"]), (13, wtype),
            (10, 256), (9, s["vocab_size"]), (12, 10000), (18, 0), (19, hd), (20, 5),
            *extra_keys]
    data = struct.pack("<ii", 0x0A00ABCD, 8 + 8 * len(keys))
    data += b"".join(struct.pack("<ii", k, v) for k, v in keys)

    def mat(w):
        return q40_by_hand(w) if wtype == 2 else np.asarray(w, np.float32).tobytes()

    data += sd["model.embed_tokens.weight"].astype(np.float32).tobytes()
    for i in range(s["n_layers"]):
        p = f"model.layers.{i}."
        data += mat(interleave_by_hand(sd[p + "self_attn.q_proj.weight"], s["n_heads"]))
        data += mat(interleave_by_hand(sd[p + "self_attn.k_proj.weight"], s["n_kv_heads"]))
        for n in ("self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj",
                  "mlp.up_proj"):
            data += mat(sd[p + n + ".weight"])
        for n in ("input_layernorm", "post_attention_layernorm"):
            data += sd[p + n + ".weight"].tobytes()
    data += sd["model.norm.weight"].tobytes() + mat(sd["lm_head.weight"])
    data = data[:len(data) - cut] + append
    open(path, "wb").write(data)
    return str(path), sd


def test_q40_by_hand_is_gguf_q4_0():
    from gguf import GGMLQuantizationType as QT
    from gguf.quants import quantize
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    x[0, :32] = 0
    x[1, :32] = -np.abs(x[1, :32])
    assert quantize(x, QT.Q4_0).tobytes() == q40_by_hand(x)


def test_reader_on_a_hand_built_file(tmp_path):
    from gguf import GGMLQuantizationType as QT
    from gguf.quants import dequantize
    path, sd = hand_m(tmp_path / "m.m")
    m = open_model(path)
    c = m.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size,
            c.head_dim, c.context_length) == (288, 416, 2, 9, 3, 320, 32, 256)
    assert abs(c.norm_eps - 1e-5) < 1e-12 and c.rope_theta == 10000 and not c.tied_embeddings
    wq = m.tensor("layers.1.wq")
    assert wq.type == "Q4_0" and m.preferred_weight_type() == "q40"
    want = interleave_by_hand(sd["model.layers.1.self_attn.q_proj.weight"], 9)
    assert wq.read().tobytes() == q40_by_hand(want)
    np.testing.assert_allclose(dequantize(wq.read(), QT.Q4_0), want, atol=0.2 * np.abs(want).max())
    np.testing.assert_array_equal(m.tensor("embedding").read(), sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(m.tensor("layers.0.ffn_norm").read(),
                                  sd["model.layers.0.post_attention_layernorm.weight"])


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_f32_m_written_from_hf_matches_transformers(tmp_path, shape):
    src = open_model(save_hf(tmp_path / "hf", shape))
    path = write_dllama_m(src, str(tmp_path / "m.m"), "f32")
    if shape == "llama3_rope":
        h = DllamaModel(path).header
        assert (h["rope_type"], h["rope_scaling_factor"], h["rope_scaling_low_freq_factor"],
                h["rope_scaling_high_freq_factor"], h["rope_scaling_orig_max_seq_len"]) == \
            (2, 8, 1, 4, 64)
    ref = hf_logits(shape, IDS)
    np.testing.assert_allclose(our_logits(SerialComm(), path, IDS), ref, rtol=0,
                               atol=tolerance(ref))


def test_f32_hand_built_file_matches_transformers(tmp_path):
    path, _ = hand_m(tmp_path / "m.m", wtype=0)
    ref = hf_logits("q40_9h", IDS)
    np.testing.assert_allclose(our_logits(SerialComm(), path, IDS), ref, rtol=0,
                               atol=tolerance(ref))


def test_q40_bytes_equal_gguf_q4_0_bytes(tmp_path):
    """The same f32 weights quantised two ways: .m Q40 (our writer) and GGUF Q4_0 (testing.gguf_writer)."""
    gguf = open_model(write_tiny_gguf(str(tmp_path / "q.gguf"), "q40_9h", weight_type="q4_0"))
    m = open_model(write_dllama_m(open_model(save_hf(tmp_path / "hf", "q40_9h")),
                                  str(tmp_path / "m.m"), "q40"))
    for name in ("layers.0.wq", "layers.0.wk", "layers.1.wo", "layers.1.w2", "wcls"):
        assert m.tensor(name).read().tobytes() == gguf.tensor(name).read().tobytes(), name
    hand, _ = hand_m(tmp_path / "hand.m")
    assert open(hand, "rb").read()[8:] != b"" and \
        open(str(tmp_path / "m.m"), "rb").read()[-1000:] == open(hand, "rb").read()[-1000:]


def test_round_trips(tmp_path):
    hand, _ = hand_m(tmp_path / "hand.m")
    again = write_dllama_m(open_model(hand), str(tmp_path / "again.m"), "q40")
    h1, h2 = open(hand, "rb").read(), open(again, "rb").read()
    n = struct.unpack("<i", h1[4:8])[0]
    assert h1[n:] == h2[struct.unpack("<i", h2[4:8])[0]:]  # every tensor byte
    assert DllamaModel(hand).config == DllamaModel(again).config
    # f32 -> .m -> GGUF-free reread: values identical
    f32 = write_dllama_m(open_model(hand_m(tmp_path / "f.m", wtype=0)[0]), str(tmp_path / "g.m"),
                         "f32")
    a, b = open_model(str(tmp_path / "f.m")), open_model(f32)
    for name in a.tensors:
        np.testing.assert_array_equal(a.tensor(name).read(), b.tensor(name).read())


def test_m_from_gguf_with_llama3_rope_recovers_integer_parameters(tmp_path):
    g = open_model(write_tiny_gguf(str(tmp_path / "l3.gguf"), "llama3_rope"))
    path = write_dllama_m(g, str(tmp_path / "l3.m"), "f32")
    assert DllamaModel(path).config.rope_freq_factors == pytest.approx(g.config.rope_freq_factors)


BAD_M = {
    "magic": (dict(), lambda b: struct.pack("<i", 0x1234) + b[4:], "not a Distributed Llama"),
    "old_magic": (dict(), lambda b: struct.pack("<i", 0xABCD01) + b[4:], "old Distributed Llama"),
    "unknown_key": (dict(extra_keys=[(99, 1)]), None, "unknown header key 99"),
    "truncated": (dict(cut=7), None, "truncated"),
    "trailing": (dict(append=b"\0"), None, "trailing bytes"),
    "float_type": (dict(wtype=9), None, "unsupported weights float type 9"),
    "qwen3_moe": (dict(extra_keys=[(1, 0xABCD02)]), None, "qwen3_moe is not supported yet"),
    # a Llama-sized body under the qwen3 arch lacks the q/k norms
    "qwen3_no_qk_norms": (dict(extra_keys=[(1, 0xABCD01)]), None, "truncated"),
    "moe": (dict(extra_keys=[(7, 8)]), None, "mixture-of-experts"),
    "header_size": (dict(), lambda b: b[:4] + struct.pack("<i", 10 ** 9) + b[8:], "header size"),
}


@pytest.mark.parametrize("case", sorted(BAD_M))
def test_malformed_m_files(tmp_path, case):
    kw, edit, message = BAD_M[case]
    path, _ = hand_m(tmp_path / "bad.m", **kw)
    if edit:
        data = open(path, "rb").read()
        open(path, "wb").write(edit(data))
    with pytest.raises(DllamaError, match=message):
        open_model(path)


def test_writer_refuses_what_a_m_cannot_hold(tmp_path):
    src = open_model(save_hf(tmp_path / "hf", "gqa6"))
    object.__setattr__(src.config, "norm_eps", 3e-5)
    with pytest.raises(DllamaError, match="norm epsilon"):
        write_dllama_m(src, str(tmp_path / "x.m"), "f32")
    assert not os.path.exists(tmp_path / "x.m")


# --------------------------------------------------------------------------- .t files

TOKENS = [b"<|endoftext|>", b"<|im_start|>", b"<|im_end|>", b"<tag>"] + \
    [bytes([b]) for b in range(256)] + [b"he", b"ll", b"llo", b"hello", b" w", b"or", b" wor", b"ld",
                                         b" world", b"12"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n" \
           "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


def hand_t(path, keys=None, tokens=TOKENS, eos=(2,), template=TEMPLATE, cut=0, magic=0x567124):
    tb = template.encode()
    keys = keys if keys is not None else [(0, 1), (1, len(tokens)), (2, max(map(len, tokens))),
                                          (3, 1), (7, len(tb)), (9, len(eos)), (10, 0)]
    data = struct.pack("<ii", magic, 8 + 8 * len(keys))
    data += b"".join(struct.pack("<ii", k, v) for k, v in keys) + tb
    data += struct.pack(f"<{len(eos)}i", *eos)
    for i, t in enumerate(tokens):
        data += struct.pack("<fI", -float(i), len(t)) + t
    open(path, "wb").write(data[:len(data) - cut])
    return str(path)


def test_t_reader_on_a_hand_built_file(tmp_path):
    tok = Tokenizer.from_dllama_t(hand_t(tmp_path / "a.t"))
    assert tok.vocab_size == len(TOKENS) and tok.bos_id == 1 and tok.eos_ids[0] == 2
    assert tok.add_bos is False and tok.chat_template == TEMPLATE
    # special tokens at low ids (below the bytes) encode as themselves
    ids = tok.encode("<|im_start|>hello world<|im_end|><tag>")
    assert ids[0] == 1 and ids[-2:] == [2, 3]
    assert tok.decode(ids[1:-2]) == "hello world"
    assert [TOKENS[i] for i in ids[1:-2]] == [b"hello", b" world"]
    assert tok.encode("<|im_start|>", parse_special=False) != [1]
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert tok.decode(tok.encode(text)) == text


def test_t_round_trip_is_byte_identical(tmp_path):
    a = hand_t(tmp_path / "a.t")
    b = write_dllama_t(Tokenizer.from_dllama_t(a), str(tmp_path / "b.t"))
    assert open(a, "rb").read() == open(b, "rb").read()


def test_t_round_trip_of_smollm2_encodes_like_its_gguf(tmp_path):
    from test_tokenizer import TEXTS, _smollm2_path
    ref = Tokenizer.from_gguf(_smollm2_path())
    tok = Tokenizer.from_dllama_t(write_dllama_t(ref, str(tmp_path / "s.t")))
    assert (tok.bos_id, tok.eos_ids[0], tok.add_bos) == (ref.bos_id, ref.eos_ids[0], ref.add_bos)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text


def test_peer_split_warning_names_vocabularies_distributed_llama_misreads(tmp_path):
    """Distributed Llama takes ids below the BOS id as its ordinary tokens: SmolLM2's BOS is
    id 1 (special tokens first), so convert --to dllama says its tokenizer will misread the
    .t; a vocabulary whose specials all sit from the BOS id on gets no warning."""
    from test_tokenizer import _smollm2_path
    from dllama_mpi.tokenizer.dllama_t import peer_split_warning
    smollm2 = Tokenizer.from_gguf(_smollm2_path())
    warning = peer_split_warning(smollm2)
    assert warning.startswith("warning: ") and "BOS id (1)" in warning
    added = set(smollm2.hf_tokenizer.get_added_tokens_decoder())    # SmolLM2's 17, ids 0-16
    assert f"{smollm2.vocab_size - len(added)} of this vocabulary's 49152" in warning
    assert "warning" in peer_split_warning(Tokenizer.from_dllama_t(hand_t(tmp_path / "a.t")))
    last = TOKENS[4:] + TOKENS[:4]                 # the same vocabulary, specials at the end
    bos, eos = last.index(b"<|im_start|>"), last.index(b"<|im_end|>")
    keys = [(0, 1), (1, len(last)), (2, max(map(len, last))), (3, bos),
            (7, len(TEMPLATE.encode())), (9, 1), (10, 0)]
    specials_last = Tokenizer.from_dllama_t(hand_t(tmp_path / "b.t", keys=keys, tokens=last,
                                                   eos=(eos,)))
    assert specials_last.bos_id == bos
    assert peer_split_warning(specials_last) is None


BAD_T = {
    "magic": (dict(magic=0x1234), "not a Distributed Llama tokenizer"),
    "old_magic": (dict(magic=0x567123), "old tokenizer format"),
    "unknown_key": (dict(keys=[(0, 1), (1, len(TOKENS)), (2, 13), (42, 0)], template=""),
                    "unknown tokenizer header key 42"),
    "version": (dict(keys=[(0, 2), (1, len(TOKENS)), (2, 13)], template="", eos=()),
                "version 2"),
    "truncated": (dict(cut=3), "truncated"),
}


@pytest.mark.parametrize("case", sorted(BAD_T))
def test_malformed_t_files(tmp_path, case):
    kw, message = BAD_T[case]
    with pytest.raises(DllamaError, match=message):
        read_dllama_t(hand_t(tmp_path / "bad.t", **kw))


def test_m_with_its_t(tmp_path):
    path, _ = hand_m(tmp_path / "model.m")
    t = hand_t(tmp_path / "model.t")
    assert open_model(path).tokenizer().chat_template == TEMPLATE  # found next to it
    other = hand_t(tmp_path / "other.t", template="x")
    assert open_model(path, tokenizer_path=other).tokenizer().chat_template == "x"
    os.unlink(t)
    os.unlink(other)
    with pytest.raises(DllamaError, match="no tokenizer"):
        open_model(path).tokenizer()
