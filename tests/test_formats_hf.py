"""Hugging Face folders read directly (formats/hf.py) and format detection (formats/__init__)."""
import json
import os
import shutil

import numpy as np
import pytest

from dllama_mpi.comm import SerialComm
from dllama_mpi.errors import DllamaError
from dllama_mpi.formats import open_model, qk_row_permutation
from dllama_mpi.testing import permute_qk
from dllama_mpi.shard import Range
from tiny import SHAPES, hf_logits, hf_model, our_logits, tolerance

IDS = [1, 17, 42, 99, 3, 150, 7, 64, 5, 180, 2, 33]


def save_hf(folder, shape: str, dtype=None, **kw) -> str:
    import torch
    model = hf_model(shape)
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(str(folder), **kw)
    return str(folder)


def ref_logits(shape: str, dtype=None) -> np.ndarray:
    import torch
    if dtype is None:
        return hf_logits(shape, IDS)
    model = hf_model(shape)
    with torch.no_grad():  # the weights the file holds (parameters only: not rope buffers)
        for p in model.parameters():
            p.copy_(p.to(getattr(torch, dtype)).float())
        return model(torch.tensor([IDS])).logits[0].numpy()


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_logits_match_transformers_at_every_position(tmp_path, shape):
    path = save_hf(tmp_path / shape, shape)
    ref = ref_logits(shape)
    ours = our_logits(SerialComm(), path, IDS)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=tolerance(ref))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_folders(tmp_path, dtype):
    path = save_hf(tmp_path / "m", "gqa6", dtype=dtype)
    m = open_model(path)
    assert m.tensor("layers.0.wq").type == {"bfloat16": "F32", "float16": "F16"}[dtype]
    ref = ref_logits("gqa6", dtype)
    np.testing.assert_allclose(our_logits(SerialComm(), path, IDS), ref, rtol=0,
                               atol=tolerance(ref))


def test_sharded_folder_with_index(tmp_path):
    path = save_hf(tmp_path / "m", "llama3_rope", max_shard_size="100KB")
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    assert len([n for n in os.listdir(path) if n.endswith(".safetensors")]) > 1
    ref = ref_logits("llama3_rope")
    np.testing.assert_allclose(our_logits(SerialComm(), path, IDS), ref, rtol=0,
                               atol=tolerance(ref))


def test_config_transformers4_style(tmp_path):
    """rope base top-level, scaling under rope_scaling, a float32-rounded epsilon."""
    path = save_hf(tmp_path / "m", "llama3_rope")
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    cfg["rms_norm_eps"] = float(np.float32(1e-5))  # 9.999999747378752e-06
    json.dump(cfg, open(cfg_path, "w"))
    c = open_model(path).config
    c5 = open_model(save_hf(tmp_path / "m5", "llama3_rope")).config
    assert c.rope_freq_factors == c5.rope_freq_factors and c.rope_theta == c5.rope_theta
    assert abs(c.norm_eps - 1e-5) < 1e-12
    ref = ref_logits("llama3_rope")
    np.testing.assert_allclose(our_logits(SerialComm(), path, IDS), ref, rtol=0,
                               atol=tolerance(ref))


def test_qk_rows_permuted_per_head_for_any_band(tmp_path):
    path = save_hf(tmp_path / "m", "q40_9h")
    m = open_model(path)
    model = hf_model("q40_9h")
    for name, hf_key, heads in (("layers.1.wq", "q_proj", 9), ("layers.1.wk", "k_proj", 3)):
        full = getattr(model.model.layers[1].self_attn, hf_key).weight.detach().numpy()
        want = permute_qk(full, heads)
        t = m.tensor(name)
        np.testing.assert_array_equal(t.read(), want)
        hd = full.shape[0] // heads
        for a, b in ((0, hd), (hd, 3 * hd), (5, 37), (hd + 1, full.shape[0])):  # heads and not
            np.testing.assert_array_equal(t.read(rows=Range(a, b)), want[a:b])
        np.testing.assert_array_equal(t.read(cols=Range(32, 96)), want[:, 32:96])
        np.testing.assert_array_equal(t.data[np.array([7, 0, 7, 40])], want[[7, 0, 7, 40]])
    assert list(qk_row_permutation(8, 2)) == [0, 2, 1, 3, 4, 6, 5, 7]


def test_tied_and_untied(tmp_path):
    assert open_model(save_hf(tmp_path / "t", "mqa3_tied")).config.tied_embeddings
    assert not open_model(save_hf(tmp_path / "u", "gqa6")).config.tied_embeddings


def write_bytes_tokenizer(folder, template_in_jinja=False) -> None:
    """A tokenizer.json (the synthetic byte-level BPE of testing.gguf_writer) + tokenizer_config.json."""
    from dllama_mpi.testing import CHATML_TEMPLATE, write_llama_gguf
    from dllama_mpi.tokenizer import Tokenizer
    g = os.path.join(folder, "tok.gguf")
    write_llama_gguf(g, dim=32, hidden_dim=32, n_layers=1, n_heads=1, n_kv_heads=1,
                     vocab_size=300, context_length=64, tokenizer="bytes",
                     tensors={k: np.zeros(s, np.float32) for k, s in {
                         "model.embed_tokens.weight": (300, 32), "model.norm.weight": (32,),
                         **{f"model.layers.0.{n}.weight": s for n, s in {
                             "input_layernorm": (32,), "post_attention_layernorm": (32,),
                             "self_attn.q_proj": (32, 32), "self_attn.k_proj": (32, 32),
                             "self_attn.v_proj": (32, 32), "self_attn.o_proj": (32, 32),
                             "mlp.gate_proj": (32, 32), "mlp.up_proj": (32, 32),
                             "mlp.down_proj": (32, 32)}.items()}}.items()})
    tok = Tokenizer.from_gguf(g)
    os.unlink(g)
    tok.hf_tokenizer.save(os.path.join(folder, "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    if template_in_jinja:
        open(os.path.join(folder, "chat_template.jinja"), "w").write(CHATML_TEMPLATE)
    else:
        cfg["chat_template"] = CHATML_TEMPLATE
    json.dump(cfg, open(os.path.join(folder, "tokenizer_config.json"), "w"))
    return tok


@pytest.mark.parametrize("jinja", [False, True])
def test_tokenizer_and_chat_template(tmp_path, jinja):
    path = save_hf(tmp_path / "m", "gqa6")
    ref = write_bytes_tokenizer(path, jinja)
    tok = open_model(path).tokenizer()
    assert tok.bos_id == 1 and tok.eos_ids[0] == 2 and tok.add_bos
    assert tok.encode("Hello world, the cluster") == ref.encode("Hello world, the cluster")
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == ref.apply_chat_template(msgs)


# ------------------------------------------------------------------------ bad folders/files

def _rewrite(path, drop=(), add=None, fname="model.safetensors"):
    from safetensors.numpy import load_file, save_file
    f = os.path.join(path, fname)
    d = load_file(f)
    for k in drop:
        d.pop(k)
    d.update(add or {})
    save_file(d, f)


def _edit_config(path, **kw):
    p = os.path.join(path, "config.json")
    cfg = json.load(open(p))
    cfg.update(kw)
    json.dump(cfg, open(p, "w"))


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    return save_hf(tmp_path_factory.mktemp("hf") / "m", "gqa6")


BAD = {
    "missing": (lambda p: _rewrite(p, drop=["model.layers.1.mlp.up_proj.weight"]),
                "missing tensor model.layers.1.mlp.up_proj.weight"),
    "unknown": (lambda p: _rewrite(p, add={"model.layers.0.self_attn.q_norm.weight":
                                           np.ones(16, np.float32)}), "unexpected tensors"),
    "shape": (lambda p: _edit_config(p, intermediate_size=192), "has shape"),
    "truncated": (lambda p: os.truncate(os.path.join(p, "model.safetensors"),
                                        os.path.getsize(os.path.join(p, "model.safetensors")) - 10),
                  "truncated or corrupt"),
    "qwen2_without_biases": (lambda p: _edit_config(p, model_type="qwen2"),
                             "missing tensor model.layers.0.self_attn.q_proj.bias"),
    "qwen3_without_qk_norms": (lambda p: _edit_config(p, model_type="qwen3"),
                               "missing tensor model.layers.0.self_attn.q_norm.weight"),
    "qwen2_moe": (lambda p: _edit_config(p, model_type="qwen2_moe"),
                  "'qwen2_moe' is not supported yet"),
    "qwen3_moe_without_experts": (lambda p: _edit_config(p, model_type="qwen3_moe"),
                                  "lacks num_experts"),
    "gelu": (lambda p: _edit_config(p, hidden_act="gelu"), "hidden_act"),
    "rope": (lambda p: _edit_config(p, rope_parameters={"rope_type": "yarn", "factor": 2.0}),
             "rope scaling type 'yarn'"),
    "no_files": (lambda p: os.unlink(os.path.join(p, "model.safetensors")), "no *.safetensors"),
    "bf16_untied_missing_head": (lambda p: (_rewrite(p, drop=["lm_head.weight"]),
                                            _edit_config(p, tie_word_embeddings=False)),
                                 "missing tensor lm_head.weight"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_folders(tmp_path, good_folder, case):
    path = str(tmp_path / "m")
    shutil.copytree(good_folder, path)
    damage, message = BAD[case]
    damage(path)
    with pytest.raises(DllamaError, match=message.replace("*", r"\*").replace("(", r"\(")):
        open_model(path)


def test_open_model_detection_errors(tmp_path):
    with pytest.raises(DllamaError, match="not found"):
        open_model(str(tmp_path / "nope.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DllamaError, match="without config.json"):
        open_model(str(tmp_path / "empty"))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world, not a model")
    with pytest.raises(DllamaError, match="unknown model format"):
        open_model(str(junk))
    old = tmp_path / "old.m"
    old.write_bytes((0xABCD00).to_bytes(4, "little") + bytes(40))
    with pytest.raises(DllamaError, match="old Distributed Llama"):
        open_model(str(old))
