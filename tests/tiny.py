"""Random tiny Llamas made with transformers, written as GGUF by our writer, and helpers
to run them through dllama_mpi. References are computed at test time."""
from __future__ import annotations

import os

import numpy as np

# Awkward shapes: heads not a power of two, n_kv_heads < n_heads, FFN not a power of two,
# vocab not a multiple of 32, tied and untied, head_dim 16/32/64.
SHAPES = {
    "gqa6": dict(dim=96, hidden_dim=160, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=300),
    "mqa3_tied": dict(dim=96, hidden_dim=224, n_layers=2, n_heads=3, n_kv_heads=1,
                      vocab_size=257, tied=True),
    "q40_9h": dict(dim=288, hidden_dim=416, n_layers=2, n_heads=9, n_kv_heads=3,
                   vocab_size=320, head_dim=32),
    "llama3_rope": dict(dim=128, hidden_dim=192, n_layers=2, n_heads=4, n_kv_heads=2,
                        vocab_size=270, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                      "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 64}),
    # K-quant rows are whole 256-value super-blocks: dim and hidden multiples of 256, so that
    # every matrix is a K-quant; at 3 ranks the in-split bands of wo (96, 96, 64 columns) and
    # w2 (448, 416, 416) cut super-blocks
    "k8h": dict(dim=256, hidden_dim=1280, n_layers=2, n_heads=8, n_kv_heads=2,
                vocab_size=300, head_dim=32),
    # w2's rows (352) are not whole super-blocks: llama.cpp's Q5_0 / Q8_0 fallbacks; tied, so
    # the output matrix is the Q4_K embedding
    "k8h_fallback": dict(dim=256, hidden_dim=352, n_layers=2, n_heads=8, n_kv_heads=2,
                         vocab_size=300, head_dim=32, tied=True),
}


def hf_model(shape: str, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    s = dict(SHAPES[shape])
    tied = s.pop("tied", False)
    head_dim = s.pop("head_dim", s["dim"] // s["n_heads"])
    cfg = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["dim"],
                      intermediate_size=s["hidden_dim"], num_hidden_layers=s["n_layers"],
                      num_attention_heads=s["n_heads"], num_key_value_heads=s["n_kv_heads"],
                      head_dim=head_dim, max_position_embeddings=256, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=tied,
                      rope_scaling=s.get("rope_scaling"), initializer_range=0.1)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # norms away from 1 so that a missing norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


# Other architectures (random tiny models of transformers' classes): same awkward shapes.
ARCH_SHAPES = {
    "llama_gqa6": dict(arch="llama", dim=96, hidden_dim=160, n_layers=2, n_heads=6,
                       n_kv_heads=2, vocab_size=300),
    "qwen2_gqa6": dict(arch="qwen2", dim=96, hidden_dim=160, n_layers=2, n_heads=6,
                       n_kv_heads=2, vocab_size=300),
    "qwen2_mqa3_tied": dict(arch="qwen2", dim=96, hidden_dim=224, n_layers=2, n_heads=3,
                            n_kv_heads=1, vocab_size=257, tied=True),
    "qwen3_gqa6": dict(arch="qwen3", dim=96, hidden_dim=160, n_layers=2, n_heads=6,
                       n_kv_heads=2, vocab_size=300, head_dim=32),  # q_dim 192 != dim
    "qwen3_9h_tied": dict(arch="qwen3", dim=288, hidden_dim=416, n_layers=2, n_heads=9,
                          n_kv_heads=3, vocab_size=320, head_dim=32, tied=True),
}


def hf_arch_model(shape: str, seed: int = 0):
    """A random tiny LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM (F32, eval),
    with norms away from 1 and biases away from 0 so that a missing one shows."""
    import torch
    import transformers
    s = dict(ARCH_SHAPES[shape])
    arch = s.pop("arch")
    prefix = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[arch]
    cfg = getattr(transformers, prefix + "Config")(
        vocab_size=s["vocab_size"], hidden_size=s["dim"], intermediate_size=s["hidden_dim"],
        num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"],
        num_key_value_heads=s["n_kv_heads"], head_dim=s.get("head_dim", s["dim"] // s["n_heads"]),
        max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=s.get("tied", False), initializer_range=0.1)
    torch.manual_seed(seed)
    model = getattr(transformers, prefix + "ForCausalLM")(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    return model


def save_hf_arch(folder: str, shape: str, seed: int = 0) -> str:
    hf_arch_model(shape, seed).save_pretrained(str(folder))
    return str(folder)


def hf_arch_logits(shape: str, ids, seed: int = 0) -> np.ndarray:
    import torch
    with torch.no_grad():
        return hf_arch_model(shape, seed)(torch.tensor([list(ids)])).logits[0].float().numpy()


def write_arch_gguf(path: str, shape: str, weight_type: str = "f32", seed: int = 0) -> str:
    """The model of hf_arch_model as a GGUF of its architecture, by our writer."""
    from dllama_mpi.testing import write_llama_gguf
    s = dict(ARCH_SHAPES[shape])
    model = hf_arch_model(shape, seed)
    tensors = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if s.get("tied"):
        tensors.pop("lm_head.weight", None)
    write_llama_gguf(path, arch=s["arch"], dim=s["dim"], hidden_dim=s["hidden_dim"],
                     n_layers=s["n_layers"], n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"],
                     vocab_size=s["vocab_size"], context_length=256, head_dim=s.get("head_dim"),
                     rope_theta=1000000.0, norm_eps=1e-6, tensors=tensors,
                     weight_type=weight_type, tokenizer=None)
    return path


def write_tiny_gguf(path: str, shape: str, weight_type: str = "f32", seed: int = 0) -> str:
    from dllama_mpi.testing import write_llama_gguf
    s = dict(SHAPES[shape])
    model = hf_model(shape, seed)
    tensors = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if s.pop("tied", False):
        tensors.pop("lm_head.weight", None)
    write_llama_gguf(path, dim=s["dim"], hidden_dim=s["hidden_dim"], n_layers=s["n_layers"],
                     n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"],
                     vocab_size=s["vocab_size"], context_length=256,
                     head_dim=s.get("head_dim"), rope_scaling=s.get("rope_scaling"),
                     tensors=tensors, weight_type=weight_type, tokenizer=None)
    return path


def hf_logits(shape: str, ids, seed: int = 0) -> np.ndarray:
    import torch
    with torch.no_grad():
        return hf_model(shape, seed)(torch.tensor([list(ids)])).logits[0].float().numpy()


def hf_greedy(shape: str, ids, n: int, seed: int = 0) -> list[int]:
    import torch
    model = hf_model(shape, seed)
    with torch.no_grad():
        out = model.generate(torch.tensor([list(ids)]), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def our_logits(comm, path: str, ids, weights="f32", wire="f32", max_seq_len=64, load="scatter"):
    """All positions' logits (root; None elsewhere). Every rank of comm must call this."""
    from dllama_mpi.config import RunConfig
    from dllama_mpi.runtime.startup import start
    run = RunConfig(weights_float_type=weights, buffer_float_type=wire, max_seq_len=max_seq_len,
                    load=load)
    s = start(comm, path, run, want_tokenizer=False)
    if not comm.is_root:
        s.engine.run_worker_loop()
        return None
    logits = s.engine.forward(list(ids), 0, all_logits=True)
    s.engine.stop()
    return logits


def our_greedy(comm, path: str, ids, n: int, weights="f32", wire="f32", max_seq_len=64):
    from dllama_mpi.config import RunConfig
    from dllama_mpi.runtime.generation import generate
    from dllama_mpi.runtime.startup import start
    run = RunConfig(weights_float_type=weights, buffer_float_type=wire, max_seq_len=max_seq_len)
    s = start(comm, path, run, want_tokenizer=False)
    if not comm.is_root:
        s.engine.run_worker_loop()
        return None
    g = generate(s.engine, list(ids), n, lambda l: int(np.argmax(l)), set(), max_seq_len)
    s.engine.stop()
    return g.generated_tokens


def tolerance(ref: np.ndarray) -> float:
    """F32 against F32 through a few layers: differences come from summation order only,
    a few float32 ulps of the largest intermediate; 1e-4 of the logit scale covers them
    with a wide margin while any real error (a wrong rope pair, a missed norm) is O(scale)."""
    return 1e-4 * float(np.abs(ref).max())


def smollm2_path() -> str:
    path = os.environ.get("DLLAMA_SMOLLM2_GGUF")
    if path and os.path.isfile(path):
        return path
    from dllama_mpi.registry import pull
    return pull("smollm2-135m", quiet=True)


def write_header_only_gguf(path, arch: str, tensor_type: str | None = None) -> str:
    """A GGUF with a header and one embedding tensor: enough for the reader to reject an
    architecture (`arch`) or a tensor type (`tensor_type`, a GGML type name) it cannot run."""
    import gguf
    import numpy as np
    w = gguf.GGUFWriter(str(path), arch)
    for key, val in (("block_count", 1), ("context_length", 64), ("embedding_length", 64),
                     ("feed_forward_length", 128), ("attention.head_count", 2)):
        w.add_uint32(f"{arch}.{key}", val)
    if tensor_type is None:
        w.add_tensor("token_embd.weight", np.zeros((300, 64), np.float32))
    else:  # raw bytes of a type the runtime does not read
        qt = getattr(gguf.GGMLQuantizationType, tensor_type)
        block, size = gguf.GGML_QUANT_SIZES[qt]
        w.add_tensor("token_embd.weight", np.zeros((300, 64 // block * size), np.uint8),
                     raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def write_cli_gguf(path: str, context_length: int = 128) -> str:
    """A tiny random Llama with a byte-level BPE tokenizer and a chat template (written by
    our GGUF writer): what the command-line tests run."""
    from dllama_mpi.testing import random_llama_tensors, write_llama_gguf
    shape = dict(dim=96, hidden_dim=160, n_layers=2, n_heads=3, n_kv_heads=1, vocab_size=400)
    write_llama_gguf(path, **shape, context_length=context_length, weight_type="f32",
                     tokenizer="bytes", tensors=random_llama_tensors(**shape, std=0.1, seed=3))
    return path


def dequantised_hf_logits(path: str, shape: str, ids) -> np.ndarray:
    """transformers' logits for the model of hf_model(shape) with the weights a GGUF holds,
    dequantised by the gguf package (q/k rows back in Hugging Face order): the reference for
    a quantised file."""
    import torch
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from dllama_mpi.formats.gguf import GGUFModel
    from dllama_mpi.testing import llama_tensor_specs, unpermute_qk
    s = dict(SHAPES[shape])
    tied = s.pop("tied", False)
    model = hf_model(shape)
    g = GGUFModel(path)
    state = {}
    for spec in llama_tensor_specs(dim=s["dim"], hidden_dim=s["hidden_dim"],
                                   n_layers=s["n_layers"], n_heads=s["n_heads"],
                                   n_kv_heads=s["n_kv_heads"], vocab_size=s["vocab_size"],
                                   head_dim=s.get("head_dim"), tied=tied):
        t = g.tensors[spec.gguf_name]
        w = np.asarray(dequantize(np.asarray(t.data), GGMLQuantizationType[t.type]),
                       np.float32).reshape(spec.shape)
        if spec.permute_heads:
            w = unpermute_qk(w, spec.permute_heads)
        state[spec.hf_name] = torch.from_numpy(np.array(w, np.float32))
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


# Mixtures of experts (random tiny Qwen3-MoE and Mixtral): 6 query heads over 2 KV heads, 4
# experts of 96 units (3 blocks: one per rank at 3 ranks), 2 used per token.
MOE_SHAPES = {
    "qwen3moe": dict(arch="qwen3moe", dim=96, hidden_dim=96, n_layers=2, n_heads=6,
                     n_kv_heads=2, vocab_size=300, head_dim=32, n_experts=4, n_experts_used=2),
    "mixtral": dict(arch="llama", dim=96, hidden_dim=96, n_layers=2, n_heads=6, n_kv_heads=2,
                    vocab_size=300, n_experts=4, n_experts_used=2),
}


def hf_moe_model(shape: str, seed: int = 0, norm_topk_prob: bool = True):
    import torch
    import transformers
    s = MOE_SHAPES[shape]
    common = dict(vocab_size=s["vocab_size"], hidden_size=s["dim"],
                  num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"],
                  num_key_value_heads=s["n_kv_heads"], num_experts_per_tok=s["n_experts_used"],
                  max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  tie_word_embeddings=False, initializer_range=0.1)
    if shape == "qwen3moe":
        cfg = transformers.Qwen3MoeConfig(**common, head_dim=s["head_dim"], intermediate_size=160,
                                          moe_intermediate_size=s["hidden_dim"],
                                          num_experts=s["n_experts"],
                                          norm_topk_prob=norm_topk_prob)
        cls = transformers.Qwen3MoeForCausalLM
    else:
        cfg = transformers.MixtralConfig(**common, intermediate_size=s["hidden_dim"],
                                         num_local_experts=s["n_experts"])
        cls = transformers.MixtralForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


def hf_moe_logits(shape: str, ids, seed: int = 0, **kw) -> np.ndarray:
    import torch
    with torch.no_grad():
        return hf_moe_model(shape, seed, **kw)(torch.tensor([list(ids)])).logits[0].float().numpy()


def hf_moe_greedy(shape: str, ids, n: int, seed: int = 0) -> list[int]:
    import torch
    with torch.no_grad():
        out = hf_moe_model(shape, seed).generate(torch.tensor([list(ids)]), max_new_tokens=n,
                                                 do_sample=False, eos_token_id=None,
                                                 pad_token_id=0)
    return out[0, len(ids):].tolist()


def save_hf_moe(folder: str, shape: str, seed: int = 0, **kw) -> str:
    hf_moe_model(shape, seed, **kw).save_pretrained(str(folder))
    return str(folder)


def write_moe_gguf(path: str, shape: str, weight_type: str = "f32", seed: int = 0) -> str:
    """The model of hf_moe_model as llama.cpp's converter writes it: the experts' matrices
    stacked [n_experts, ...] (ffn_{gate,up,down}_exps), the router F32 (ffn_gate_inp)."""
    from dllama_mpi.testing import write_llama_gguf
    s = MOE_SHAPES[shape]
    sd = {k: v.detach().float().numpy() for k, v in hf_moe_model(shape, seed).state_dict().items()}
    tensors, h = {}, s["hidden_dim"]
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):     # [E, 2h, dim]: gate rows, then up
            p = k[:-len("gate_up_proj")]
            tensors[p + "gate_proj"], tensors[p + "up_proj"] = v[:, :h], v[:, h:]
        elif k.endswith("mlp.experts.down_proj"):
            tensors[k] = v
        else:
            tensors[k] = v
    write_llama_gguf(path, arch=s["arch"], dim=s["dim"], hidden_dim=h, n_layers=s["n_layers"],
                     n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"],
                     vocab_size=s["vocab_size"], context_length=256, head_dim=s.get("head_dim"),
                     rope_theta=1000000.0, norm_eps=1e-6, tensors=tensors,
                     weight_type=weight_type, tokenizer=None, n_experts=s["n_experts"],
                     n_experts_used=s["n_experts_used"])
    return path
