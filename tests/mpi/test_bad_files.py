"""Bad model files on N ranks: `mpiexec -n N bash tests/mpi/run_rank.sh tests/mpi`.

Every malformation the readers detect, in every format, started the way the command line
starts a run (session.start on the world communicator, tokenizer wanted): the root prints
one `error: …` line naming the problem, and every rank leaves start() with the same
StartupFailed carrying that message — no rank is left waiting in a collective (a hang
fails the test through its timeout, which ends the process and so the MPI job).
"""
import json
import os
import struct

import pytest

from dllama_mpi.config import RunConfig
from dllama_mpi.runtime.startup import StartupFailed, start
from mpi_util import on_root
from tiny import write_header_only_gguf

# 6 query heads: every rank count run here (2, 3, 4) is possible for the good model, so
# the only thing wrong is the file
SHAPE = dict(dim=96, hidden_dim=160, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=300)


def _good_gguf(d: str) -> str:
    from dllama_mpi.testing import random_llama_tensors, write_llama_gguf
    path = os.path.join(d, "good.gguf")
    write_llama_gguf(path, **SHAPE, context_length=128, weight_type="f32", tokenizer="bytes",
                     tensors=random_llama_tensors(**SHAPE, std=0.1, seed=3))
    return path


def _copy(src: str, dst: str, edit=None) -> str:
    data = open(src, "rb").read()
    with open(dst, "wb") as f:
        f.write(edit(data) if edit else data)
    return dst


def _m_header_edit(set_keys=None, add_keys=()):
    """An edit of a .m file's header: values of existing keys replaced, keys appended."""
    def edit(data: bytes) -> bytes:
        magic, size = struct.unpack("<ii", data[:8])
        values = list(struct.unpack(f"<{(size - 8) // 4}i", data[8:size]))
        pairs = [(k, (set_keys or {}).get(k, v)) for k, v in zip(values[::2], values[1::2])]
        pairs += list(add_keys)
        head = struct.pack("<ii", magic, 8 + 8 * len(pairs))
        return head + b"".join(struct.pack("<ii", k, v) for k, v in pairs) + data[size:]
    return edit


def _h5_edit(path: str, how: str) -> str:
    import h5py
    with h5py.File(path, "a") as f:
        if how == "version":
            f.attrs["format_version"] = 99
        else:
            del f["tensors/layers.1.w3"]
    return path


HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
             "hidden_size": SHAPE["dim"], "intermediate_size": SHAPE["hidden_dim"],
             "num_hidden_layers": SHAPE["n_layers"], "num_attention_heads": SHAPE["n_heads"],
             "num_key_value_heads": SHAPE["n_kv_heads"], "vocab_size": SHAPE["vocab_size"],
             "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
             "tie_word_embeddings": False, "torch_dtype": "float32"}


def _folder(d: str, name: str, config: bool, safetensors: bool) -> str:
    path = os.path.join(d, name)
    os.makedirs(path)
    if config:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(HF_CONFIG, f)
    if safetensors:
        import numpy as np
        from safetensors.numpy import save_file
        save_file({"model.norm.weight": np.ones(SHAPE["dim"], np.float32)},
                  os.path.join(path, "model.safetensors"))
    return path


def make_bad_files(d: str) -> dict[str, str]:
    """Case name -> path of a model with that one thing wrong (written by the root)."""
    from dllama_mpi.apps.convert import convert
    good = _good_gguf(d)
    good_m = convert(good, os.path.join(d, "good.m"), "f32", to="dllama", progress=False)[0]
    good_h5 = convert(good, os.path.join(d, "good.h5"), "f32", progress=False)[0]
    j = lambda name: os.path.join(d, name)  # noqa: E731
    size = os.path.getsize(good)
    return {
        "gguf_truncated": _copy(good, j("cut.gguf"), lambda b: b[: size * 2 // 3]),
        "gguf_not_a_gguf": _copy(good, j("junk.gguf"), lambda b: b"this is not a model" * 100),
        "gguf_bad_magic": _copy(good, j("magic.gguf"), lambda b: b"GGUX" + b[4:]),
        "gguf_architecture": write_header_only_gguf(j("falcon.gguf"), "falcon"),
        "gguf_tensor_type": write_header_only_gguf(j("iq4.gguf"), "llama", tensor_type="IQ4_NL"),
        "m_magic": _copy(good_m, j("magic.m"), lambda b: struct.pack("<i", 0x1234) + b[4:]),
        "m_unknown_key": _copy(good_m, j("key.m"), _m_header_edit(add_keys=[(99, 1)])),
        "m_truncated": _copy(good_m, j("cut.m"), lambda b: b[:-7]),
        "m_trailing": _copy(good_m, j("long.m"), lambda b: b + b"\0" * 5),
        "m_float_type": _copy(good_m, j("float.m"), _m_header_edit(set_keys={13: 9})),
        "hf_no_config": _folder(d, "hf-no-config", config=False, safetensors=True),
        "hf_no_safetensors": _folder(d, "hf-no-safetensors", config=True, safetensors=False),
        "h5_version": _h5_edit(_copy(good_h5, j("version.h5")), "version"),
        "h5_missing_dataset": _h5_edit(_copy(good_h5, j("missing.h5")), "missing"),
        "h5_truncated": _copy(good_h5, j("cut.h5"), lambda b: b[: len(b) // 2]),
    }


# case -> words the error must contain (besides the file's path)
EXPECTED = {
    "gguf_truncated": ["truncated"],
    "gguf_not_a_gguf": ["unknown model format"],
    "gguf_bad_magic": ["unknown model format"],
    "gguf_architecture": ["unsupported architecture 'falcon'"],
    "gguf_tensor_type": ["token_embd.weight", "type IQ4_NL"],
    "m_magic": ["not a Distributed Llama model", "magic 0x1234"],
    "m_unknown_key": ["unknown header key 99"],
    "m_truncated": ["truncated"],
    "m_trailing": ["trailing bytes"],
    "m_float_type": ["unsupported weights float type 9"],
    "hf_no_config": ["without config.json"],
    "hf_no_safetensors": ["no *.safetensors files"],
    "h5_version": ["model store version 99"],
    "h5_missing_dataset": ["missing tensor layers.1.w3"],
    "h5_truncated": ["truncated or corrupt"],
}


@pytest.fixture(scope="module")
def bad_files(comm, shared_dir):
    return on_root(comm, lambda: make_bad_files(shared_dir))


def start_like_the_cli(comm, path: str, load: str):
    """session.start as `inference` calls it; returns what happened on this rank."""
    try:
        s = start(comm, path, RunConfig(load=load))
    except StartupFailed as e:
        return ("StartupFailed", e.code, e.message)
    except BaseException as e:  # noqa: BLE001 - reported, compared across ranks
        return (type(e).__name__, None, str(e))
    if comm.is_root:  # it started: let every rank finish cleanly, then fail below
        s.engine.stop()
    else:
        s.engine.run_worker_loop()
    return ("started", 0, "")


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120, method="thread")  # a hang ends this process, and so the MPI job
@pytest.mark.parametrize("load", ["scatter", "direct"])
@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_file_is_one_clear_error_on_every_rank(comm, bad_files, capfd, case, load):
    path = bad_files[case]
    outcome = start_like_the_cli(comm, path, load)
    err = capfd.readouterr().err
    everyone = comm.allgather_obj((outcome, err))
    kind, code, message = everyone[0][0]
    assert kind == "StartupFailed" and code == 1, f"rank 0: {everyone[0][0]}"
    for r, (o, _) in enumerate(everyone):
        assert o == everyone[0][0], f"rank {r} got {o}, rank 0 {everyone[0][0]}"
    for words in EXPECTED[case] + [os.path.basename(path)]:
        assert words in message, f"{case}: {words!r} not in {message!r}"
    lines = [line for line in everyone[0][1].splitlines() if line.startswith("error:")]
    assert lines == [f"error: {message}"], everyone[0][1]
    for r, (_, e) in enumerate(everyone[1:], 1):  # the root speaks for everyone
        assert "error:" not in e and "Traceback" not in e, f"rank {r} printed: {e}"
