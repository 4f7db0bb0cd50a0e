"""Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm) against transformers, one process.

Random tiny Qwen2ForCausalLM / Qwen3ForCausalLM (tests/tiny.py ARCH_SHAPES: heads not a power
of two, n_kv_heads < n_heads, head_dim * n_heads != dim, tied and untied) saved with
save_pretrained, then run from the folder, its .h5 conversion, a GGUF of its architecture and
(Qwen3) a Distributed Llama .m: the logits at every position match transformers.
"""
import json
import os

import numpy as np
import pytest

from dllama_mpi.comm import SerialComm
from dllama_mpi.apps.convert import convert
from dllama_mpi.errors import DllamaError
from dllama_mpi.formats import open_model
from dllama_mpi.formats.dllama import ARCH_QWEN3, ROPE_FALCON, read_header, tensor_layout
from tiny import (ARCH_SHAPES, hf_arch_logits, hf_arch_model, our_logits, save_hf_arch,
                  tolerance, write_arch_gguf)

IDS = [1, 17, 42, 99, 3, 150, 7, 64, 5, 180, 2, 33]
QWEN = sorted(s for s in ARCH_SHAPES if s.startswith("qwen"))


def model_file(tmp_path, shape: str, form: str) -> str:
    """The tiny model `shape` as a Hugging Face folder, .h5 (f32), GGUF (f32) or .m (f32)."""
    if form == "gguf":
        return write_arch_gguf(str(tmp_path / f"{shape}.gguf"), shape)
    folder = save_hf_arch(str(tmp_path / shape), shape)
    if form == "hf":
        return folder
    out = str(tmp_path / f"{shape}.{form}")
    return convert(folder, out, "f32", progress=False)[0]


# a .m file cannot hold Qwen2's biases: that case is test_m_refuses_qwen2
CASES = [(shape, form) for shape in QWEN for form in ("hf", "h5", "gguf", "m")
         if not (form == "m" and ARCH_SHAPES[shape]["arch"] == "qwen2")]


@pytest.mark.parametrize("shape,form", CASES)
def test_logits_match_transformers_at_every_position(tmp_path, shape, form):
    path = model_file(tmp_path, shape, form)
    ref = hf_arch_logits(shape, IDS)
    ours = our_logits(SerialComm(), path, IDS)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=tolerance(ref))


def test_config_flags_from_every_format(tmp_path):
    for shape, bias, norm in (("qwen2_gqa6", True, False), ("qwen3_gqa6", False, True)):
        for form in ("hf", "h5", "gguf"):
            os.makedirs(tmp_path / form, exist_ok=True)
            c = open_model(model_file(tmp_path / form, shape, form)).config
            assert (c.arch, c.attn_bias, c.qk_norm) == (shape[:5], bias, norm), (shape, form)


@pytest.mark.parametrize("shape", ["qwen2_mqa3_tied", "qwen3_gqa6"])
def test_greedy_decode_matches_transformers(tmp_path, shape):
    """Token by token through the KV cache (biases and q/k norms on the decode path)."""
    import torch

    from tiny import our_greedy
    path = save_hf_arch(str(tmp_path / shape), shape)
    with torch.no_grad():
        out = hf_arch_model(shape).generate(torch.tensor([IDS[:4]]), max_new_tokens=16,
                                            do_sample=False, eos_token_id=None, pad_token_id=0)
    assert our_greedy(SerialComm(), path, IDS[:4], 16) == out[0, 4:].tolist()


def test_biases_and_norms_matter(tmp_path):
    """The references would catch a dropped bias or q/k norm (they are far from 0 and 1)."""
    import torch
    for shape, part in (("qwen2_gqa6", "q_proj.bias"), ("qwen3_gqa6", "k_norm.weight")):
        model = hf_arch_model(shape)
        with torch.no_grad():
            ref = model(torch.tensor([IDS])).logits[0].numpy()
            for name, p in model.named_parameters():
                if name.endswith(part):
                    p.copy_(torch.zeros_like(p) if "bias" in part else torch.ones_like(p))
            changed = model(torch.tensor([IDS])).logits[0].numpy()
        assert np.abs(changed - ref).max() > 100 * tolerance(ref)


def test_4bit_runtime_on_qwen3(tmp_path):
    """Q4_0 GGUF (permuted rows pass through bit for bit) on the Q40 x Q80 kernels: close to
    the F32 path on the same file."""
    path = write_arch_gguf(str(tmp_path / "q.gguf"), "qwen3_9h_tied", weight_type="q4_0")
    q = our_logits(SerialComm(), path, IDS, weights="q40", wire="q80")
    f = our_logits(SerialComm(), path, IDS)
    assert np.linalg.norm(q - f) / np.linalg.norm(f) < 0.1


def test_qwen3_m_file_layout(tmp_path):
    """The .m we write for Qwen3 is what Distributed Llama's converter writes: arch 0xABCD01,
    falcon rope, wq/wk and the q/k norms in Hugging Face's (rotate-half) order, the norms
    after w3 and before attn_norm."""
    shape = "qwen3_gqa6"
    path = model_file(tmp_path, shape, "m")
    header, size = read_header(path)
    assert header["arch_type"] == ARCH_QWEN3 and header["rope_type"] == ROPE_FALCON
    assert header["head_dim"] == 32 and header["norm_epsilon"] == 6
    state = {k: v.numpy() for k, v in hf_arch_model(shape).state_dict().items()}
    c = open_model(path).config
    layout = tensor_layout(c, "F32")
    names = [n for n, _, _ in layout]
    assert names[names.index("layers.0.w3") + 1:names.index("layers.0.attn_norm")] == \
        ["layers.0.q_norm", "layers.0.k_norm"]
    raw = np.fromfile(path, np.uint8)
    offset = size
    for name, _, shp in layout:
        n = int(np.prod(shp)) * 4
        if name in ("layers.0.wq", "layers.0.k_norm", "layers.1.wk"):
            i, short = name.split(".")[1:]
            hf = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj",
                  "k_norm": "self_attn.k_norm"}[short]
            got = raw[offset:offset + n].view(np.float32).reshape(shp)
            np.testing.assert_array_equal(got, state[f"model.layers.{i}.{hf}.weight"])
        offset += n
    assert offset == raw.size


def test_m_refuses_qwen2(tmp_path):
    folder = save_hf_arch(str(tmp_path / "q2"), "qwen2_gqa6")
    with pytest.raises(DllamaError, match="biases"):
        convert(folder, str(tmp_path / "q2.m"), "f32", progress=False)
    assert not os.path.exists(tmp_path / "q2.m")


@pytest.mark.parametrize("edit,message", [
    ({"attention_bias": True}, "attention_bias"),   # Qwen3 then has an o_proj bias too
    ({"model_type": "qwen2_moe"}, "shared experts"),   # Qwen3-MoE and Mixtral: test_moe.py
])
def test_hf_unsupported_variants(tmp_path, edit, message):
    folder = save_hf_arch(str(tmp_path / "q3"), "qwen3_gqa6")
    cfg_path = os.path.join(folder, "config.json")
    cfg = json.load(open(cfg_path))
    cfg.update(edit)
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(DllamaError, match=message):
        open_model(folder)


def test_gguf_unknown_bias_is_refused(tmp_path):
    """A GGUF with a bias we do not run (attn_output.bias) is an error, not silently dropped."""
    import gguf
    from dllama_mpi.formats.gguf import GGUFModel
    src = write_arch_gguf(str(tmp_path / "q.gguf"), "qwen2_gqa6")
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "qwen2")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        w.add_key_value(f.name, f.contents(), f.types[0],
                        f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data))
    w.add_tensor("blk.0.attn_output.bias", np.zeros(96, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(DllamaError, match="attn_output.bias"):
        GGUFModel(str(tmp_path / "bad.gguf"))


def test_qwen3_m_bytes_equal_from_every_source(tmp_path):
    """HF folder, GGUF (rotate-half rows) and .h5 (interleaved rows) of one Qwen3 all convert
    to the same .m bytes (Q40): the permutations on read and on write are exact inverses."""
    shape = "qwen3_9h_tied"
    folder = save_hf_arch(str(tmp_path / "q3"), shape)
    sources = [folder, write_arch_gguf(str(tmp_path / "q3.gguf"), shape),
               convert(folder, str(tmp_path / "q3.h5"), "f32", progress=False)[0]]
    outs = [open(convert(src, str(tmp_path / f"{i}.m"), "q40", progress=False)[0], "rb").read()
            for i, src in enumerate(sources)]
    assert outs[0] == outs[1] == outs[2]
