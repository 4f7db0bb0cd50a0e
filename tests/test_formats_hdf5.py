"""Our HDF5 model store (formats/hdf5.py) and `convert` (convert.py)."""
import os
import shutil

import h5py
import numpy as np
import pytest

from dllama_mpi.comm import SerialComm
from dllama_mpi.apps.convert import convert, main
from dllama_mpi.errors import DllamaError
from dllama_mpi.formats import open_model
from test_formats_hf import IDS, save_hf, write_bytes_tokenizer
from tiny import SHAPES, hf_logits, our_logits, tolerance, write_tiny_gguf


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_f32_store_from_hf_matches_transformers(tmp_path, shape):
    h5 = convert(save_hf(tmp_path / "hf", shape), str(tmp_path / "m.h5"), "f32",
                 progress=False)[0]
    ref = hf_logits(shape, IDS)
    np.testing.assert_allclose(our_logits(SerialComm(), h5, IDS), ref, rtol=0,
                               atol=tolerance(ref))


def test_q40_store_keeps_gguf_q4_0_bytes_and_runs_like_it(tmp_path):
    g = write_tiny_gguf(str(tmp_path / "q.gguf"), "q40_9h", weight_type="q4_0")
    h5 = convert(g, str(tmp_path / "q.h5"), "q40", progress=False)[0]
    a, b = open_model(g), open_model(h5)
    for name in ("layers.0.wq", "layers.1.w2", "layers.1.wo"):
        assert b.tensor(name).type == "Q4_0"
        assert a.tensor(name).read().tobytes() == b.tensor(name).read().tobytes()
    assert b.preferred_weight_type() == "q40"
    np.testing.assert_array_equal(our_logits(SerialComm(), h5, IDS, weights="q40", wire="q80"),
                                  our_logits(SerialComm(), g, IDS, weights="q40", wire="q80"))


def test_layout_chunks_config_and_tokenizer(tmp_path):
    hf = save_hf(tmp_path / "hf", "gqa6")
    ref = write_bytes_tokenizer(hf)
    h5 = convert(hf, str(tmp_path / "m.h5"), "q40", progress=False)[0]
    with h5py.File(h5, "r") as f:
        assert f.attrs["format"] == "dllama_mpi" and f.attrs["format_version"] == 1
        assert f.attrs["dim"] == 96 and f.attrs["n_heads"] == 6
        wq, wo = f["tensors/layers.0.wq"], f["tensors/layers.0.wo"]
        assert wq.attrs["ggml_type"] == "Q4_0" and list(wq.attrs["shape"]) == [96, 96]
        assert wq.shape == (96, 96 // 32 * 18) and wq.chunks[0] % 32 == 0 or wq.chunks[0] == 96
        assert wo.chunks == (96, 18)  # in-split: one 32-block of columns, all rows
        assert f["tensors/embedding"].attrs["ggml_type"] == "Q8_0"
        assert f["tensors/final_norm"].dtype == np.float32
    m = open_model(h5)
    tok = m.tokenizer()
    assert tok.bos_id == ref.bos_id and tok.eos_ids == ref.eos_ids and tok.add_bos
    assert tok.chat_template == ref.chat_template
    assert tok.encode("Hello world, the cluster") == ref.encode("Hello world, the cluster")
    assert m.config == open_model(hf).config


@pytest.mark.skipif(shutil.which("h5dump") is None or shutil.which("h5ls") is None,
                    reason="HDF5 command-line tools not installed (apt-get install hdf5-tools)")
def test_standard_tools_read_the_store(tmp_path):
    """h5ls and h5dump (the site's HDF5 tools, possibly older than h5py's library) read the
    whole store: groups, datasets, every attribute, the chunk layout."""
    import subprocess
    hf = save_hf(tmp_path / "hf", "gqa6")
    write_bytes_tokenizer(hf)
    h5 = convert(hf, str(tmp_path / "m.h5"), "q40", progress=False)[0]

    def tool(*args):
        p = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and "error" not in p.stdout + p.stderr, p.stdout + p.stderr
        return p.stdout
    listing = tool("h5ls", "-r", h5)
    for path in ("/tensors/layers.1.w2", "/tensors/embedding", "/tokenizer/tokenizer_json"):
        assert path in listing
    header = tool("h5dump", "-H", h5)
    for attr in ("format", "format_version", "config", "tied_embeddings", "add_bos", "eos_ids"):
        assert f'ATTRIBUTE "{attr}"' in header
    assert "CHUNKED ( 96, 18 )" in tool("h5dump", "-H", "-p", "-d", "/tensors/layers.0.wo", h5)


def test_f16_store(tmp_path):
    h5 = convert(save_hf(tmp_path / "hf", "gqa6"), str(tmp_path / "m.h5"), "f16",
                 progress=False)[0]
    assert open_model(h5).tensor("layers.0.w1").type == "F16"
    ref = hf_logits("gqa6", IDS)
    ours = our_logits(SerialComm(), h5, IDS)
    assert np.abs(ours - ref).max() < 1e-2 * np.abs(ref).max()


def test_convert_cli_to_dllama_and_back(tmp_path):
    hf = save_hf(tmp_path / "hf", "q40_9h")
    write_bytes_tokenizer(hf)
    out = str(tmp_path / "x.m")
    assert main([hf, "--to", "dllama", "-o", out, "--weights-float-type", "f32",
                 "--no-progress"]) == 0
    assert os.path.isfile(str(tmp_path / "x.t"))
    assert main([out, "-o", str(tmp_path / "x.h5"), "--weights-float-type", "f32",
                 "--no-progress"]) == 0
    a, b = open_model(hf), open_model(str(tmp_path / "x.h5"))
    for name in a.tensors:
        np.testing.assert_array_equal(a.tensor(name).read(), b.tensor(name).read())
    assert b.tokenizer().encode("hello world") == a.tokenizer().encode("hello world")
    assert main([str(tmp_path / "nope"), "-o", str(tmp_path / "y.h5")]) == 1


def test_failed_conversion_leaves_no_file(tmp_path, monkeypatch):
    from dllama_mpi.formats import dllama
    hf = save_hf(tmp_path / "hf", "gqa6")
    calls = []

    def failing(tensor, target, chunk_values=0):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("disk full")
        yield from original(tensor, target)

    original = dllama.convert_rows
    monkeypatch.setattr(dllama, "convert_rows", failing)
    with pytest.raises(RuntimeError):
        convert(hf, str(tmp_path / "m.h5"), "f32", progress=False)
    assert os.listdir(tmp_path) == ["hf"]


def _damage(path, how):
    with h5py.File(path, "a") as f:
        if how == "missing":
            del f["tensors/layers.1.w3"]
        elif how == "unknown":
            f["tensors/extra"] = np.zeros(3, np.float32)
        elif how == "shape":
            f["tensors/layers.0.wq"].attrs["shape"] = np.asarray([7, 96])
        elif how == "version":
            f.attrs["format_version"] = 99
        elif how == "format":
            f.attrs["format"] = "other"
        elif how == "type":
            f["tensors/layers.0.wq"].attrs["ggml_type"] = "Q6_K"


@pytest.fixture(scope="module")
def good_h5(tmp_path_factory):
    d = tmp_path_factory.mktemp("h5")
    return convert(save_hf(d / "hf", "gqa6"), str(d / "m.h5"), "f32", progress=False)[0]


@pytest.mark.parametrize("how,message", [
    ("missing", "missing tensor layers.1.w3"), ("unknown", "unexpected tensors"),
    ("shape", "has shape"), ("version", "version 99"), ("format", "not a dllama_mpi"),
    ("type", "unsupported type 'Q6_K'"), ("truncated", "truncated or corrupt")])
def test_malformed_stores(tmp_path, good_h5, how, message):
    import shutil
    path = str(tmp_path / "bad.h5")
    shutil.copy(good_h5, path)
    if how == "truncated":
        os.truncate(path, os.path.getsize(path) // 2)
    else:
        _damage(path, how)
    with pytest.raises(DllamaError, match=message):
        open_model(path)


# ------------------------------------------------------------------ convert keeps the file's types

def _same_tensors(a, b):
    """Every tensor of model b has model a's type and bytes."""
    from dllama_mpi.formats import expected_shapes
    for name in expected_shapes(a.config):
        ta, tb = a.tensor(name), b.tensor(name)
        assert tb.type == ta.type, name
        assert ta.read().tobytes() == tb.read().tobytes(), name


def test_q41_gguf_converts_to_a_q41_store_byte_for_byte(tmp_path):
    """The default (auto) keeps Q4_1 as Q4_1: every tensor's bytes equal the GGUF's, and the
    store runs as q41 with the same logits (the issue: it was re-quantised to Q4_0)."""
    g = write_tiny_gguf(str(tmp_path / "q.gguf"), "q40_9h", weight_type="q4_1")
    h5 = convert(g, str(tmp_path / "q.h5"), progress=False)[0]
    a, b = open_model(g), open_model(h5)
    assert a.tensor("layers.0.wq").type == "Q4_1"
    _same_tensors(a, b)
    assert b.preferred_weight_type() == "q41"
    np.testing.assert_array_equal(our_logits(SerialComm(), h5, IDS, weights="q41", wire="q80"),
                                  our_logits(SerialComm(), g, IDS, weights="q41", wire="q80"))


@pytest.mark.parametrize("weight_type", ["q4_0", "q8_0", "f16", "f32"])
def test_auto_keeps_every_store_type(tmp_path, weight_type):
    g = write_tiny_gguf(str(tmp_path / "m.gguf"), "q40_9h", weight_type=weight_type)
    _same_tensors(open_model(g), open_model(convert(g, str(tmp_path / "m.h5"), progress=False)[0]))


def test_explicit_q41_store_from_f32(tmp_path):
    hf = save_hf(tmp_path / "hf", "q40_9h")
    h5 = convert(hf, str(tmp_path / "m.h5"), "q41", progress=False)[0]
    m = open_model(h5)
    assert m.tensor("layers.0.w2").type == "Q4_1" and m.tensor("embedding").type == "Q8_0"
    from dllama_mpi.quant import quantize_q41
    w2 = np.asarray(open_model(hf).tensor("layers.0.w2").read(), np.float32)
    assert m.tensor("layers.0.w2").read().tobytes() == quantize_q41(w2).tobytes()
    assert np.isfinite(our_logits(SerialComm(), h5, IDS, weights="q41", wire="q80")).all()


def test_convert_says_what_it_keeps_and_what_it_loses(tmp_path, capsys):
    g = write_tiny_gguf(str(tmp_path / "q.gguf"), "q40_9h", weight_type="q4_1")
    assert main([g, "-o", str(tmp_path / "a.h5"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "kept as in the file: F32 x" in err and "Q4_1 x" in err and "lossy" not in err
    assert main([g, "-o", str(tmp_path / "b.h5"), "--weights-float-type", "q40",
                 "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "lossy: Q4_1 -> Q4_0 x" in err and "wrote " in out
    assert open_model(str(tmp_path / "b.h5")).tensor("layers.0.wq").type == "Q4_0"
    # an .m file has no Q4_1: auto picks Q8_0 and says it is lossy
    assert main([g, "--to", "dllama", "-o", str(tmp_path / "c.m"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "weights: q80" in err and "lossy: Q4_1 -> Q8_0" in err
    # q41 cannot go to an .m file: one error
    assert main([g, "--to", "dllama", "-o", str(tmp_path / "d.m"), "--weights-float-type", "q41",
                 "--no-progress"]) == 1
    assert capsys.readouterr().err.count("error:") == 1


def test_q40_gguf_to_dllama_auto_is_q40_and_lossless(tmp_path, capsys):
    g = write_tiny_gguf(str(tmp_path / "q.gguf"), "q40_9h", weight_type="q4_0")
    assert main([g, "--to", "dllama", "-o", str(tmp_path / "c.m"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "weights: q40" in err and "lossy" not in err
    assert open_model(str(tmp_path / "c.m")).tensor("layers.0.wq").type == "Q4_0"


def test_convert_takes_a_known_model_name(tmp_path, monkeypatch, capsys):
    """`convert smollm2-135m` finds the model in the cache as every other command does (a
    tiny Q4_1 stands in for it in a cache of its own: nothing is downloaded)."""
    from dllama_mpi import registry
    g = write_tiny_gguf(str(tmp_path / "q.gguf"), "q40_9h", weight_type="q4_1")
    monkeypatch.setenv("DLLAMA_MPI_CACHE", str(tmp_path / "cache"))
    os.makedirs(os.path.dirname(registry.cached_path("smollm2-135m")))
    shutil.copy(g, registry.cached_path("smollm2-135m"))
    monkeypatch.chdir(tmp_path)
    assert main(["smollm2-135m", "--no-progress"]) == 0
    out = capsys.readouterr().out
    written = os.path.join(tmp_path, "SmolLM2-135M-Instruct.Q4_1.h5")
    assert f"wrote {os.path.basename(written)}" in out
    _same_tensors(open_model(g), open_model(written))
