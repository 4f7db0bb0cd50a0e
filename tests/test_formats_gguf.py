"""GGUF model files (formats/gguf.py): our header parser against the `gguf` package's reader.

GGUFModel parses the header itself (gguf.GGUFReader took 5 s and 160 MB on every rank
that opened SmolLM2, indexing every vocabulary entry); it must give the same metadata and
the same tensor bytes, and turn a damaged header into a clean error.
"""
import gguf
import numpy as np
import pytest

from dllama_mpi.errors import DllamaError
from dllama_mpi.formats import open_model
from dllama_mpi.formats.gguf import GGUFModel
from dllama_mpi.formats.gguf_header import _LazyArray
from dllama_mpi.testing import random_llama_tensors, write_llama_gguf

SHAPE = dict(dim=96, hidden_dim=160, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=300)


def _write(path, weight_type, **kw):
    return str(write_llama_gguf(path, **SHAPE, context_length=128, weight_type=weight_type,
                                tokenizer="bytes", tensors=random_llama_tensors(**SHAPE, seed=1),
                                **kw))


@pytest.mark.parametrize("weight_type", ["f32", "f16", "q4_0", "q4_1", "q8_0"])
def test_header_and_tensors_equal_the_gguf_package(tmp_path, weight_type):
    path = _write(tmp_path / "m.gguf", weight_type,
                  extra_metadata={"test.flag": True, "test.big": -5, "test.text": "héllo"})
    ours, ref = GGUFModel(path), gguf.GGUFReader(path)
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert set(ours.header.fields) == set(fields)
    for key, f in fields.items():
        assert ours.field(key) == f.contents(), key
    assert isinstance(ours.header.fields["tokenizer.ggml.tokens"], _LazyArray)  # not read
    assert len(ours.tensors) == len(ref.tensors)
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.type == t.tensor_type.name
        assert mine.shape == tuple(reversed(t.shape.tolist()))
        assert mine.data.dtype == t.data.dtype and mine.data.shape == t.data.shape
        np.testing.assert_array_equal(np.asarray(mine.data), np.asarray(t.data))


def test_tokenizer_from_our_header(tmp_path):
    from dllama_mpi.tokenizer import Tokenizer
    path = _write(tmp_path / "m.gguf", "f32")
    tok = open_model(path).tokenizer()
    assert tok.encode("hello world") == Tokenizer.from_gguf(gguf.GGUFReader(path)).encode(
        "hello world")


@pytest.mark.parametrize("cut,message", [
    (30, "truncated or corrupt"),           # inside the key/values
    (None, "truncated or corrupt"),          # inside the tensor table (set below)
    (-100, "is truncated: tensor"),          # inside the last tensor's data
])
def test_damaged_files(tmp_path, cut, message):
    path = _write(tmp_path / "m.gguf", "f32")
    data = open(path, "rb").read()
    if cut is None:  # the byte before the first tensor name's data: mid tensor table
        cut = data.index(b"token_embd.weight") + 3
    open(path, "wb").write(data[:cut])
    with pytest.raises(DllamaError, match=message):
        GGUFModel(path)


def test_bf16_column_band_is_cut_in_values_not_bytes():
    """A GGUF's BF16 tensor is raw bytes [out, 2 * in]: a rank's column band (wo, w2) must
    be the same columns' values."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from dllama_mpi.formats.base import Tensor
    from dllama_mpi.shard import Range
    x = np.random.default_rng(0).standard_normal((4, 96)).astype(np.float32)
    raw = quantize(x, GGMLQuantizationType.BF16)
    t = Tensor("w", "BF16", x.shape, raw)
    want = dequantize(raw, GGMLQuantizationType.BF16)
    for band in (Range(0, 32), Range(32, 96), Range(5, 50)):
        got = dequantize(np.ascontiguousarray(t.read(rows=Range(1, 3), cols=band)),
                         GGMLQuantizationType.BF16)
        np.testing.assert_array_equal(got, want[1:3, band.start:band.stop])


def _split(tmp_path, weight_type="q4_0", max_tensors=6):  # 21 tensors: 4 parts
    from dllama_mpi.testing import split_gguf
    whole = _write(tmp_path / "whole.gguf", weight_type)
    return whole, [str(p) for p in split_gguf(whole, tmp_path / "m", max_tensors)]


def test_split_gguf_opens_from_any_part(tmp_path):
    """llama.cpp's split GGUF (split.no / split.count / split.tensors.count; the metadata in
    the first part only): any part opens the whole model, tensors from whichever part holds
    them, the same bytes as the unsplit file."""
    whole, parts = _split(tmp_path)
    assert [p.rsplit("/", 1)[1] for p in parts] == [f"m-0000{i}-of-00004.gguf" for i in (1, 2, 3, 4)]
    ref = GGUFModel(whole)
    for part in parts:
        m = open_model(part)
        assert m.parts == parts and m.path == parts[0]
        assert m.config == ref.config and set(m.tensors) == set(ref.tensors)
        for name, t in ref.tensors.items():
            np.testing.assert_array_equal(np.asarray(m.tensors[name].data), np.asarray(t.data))
        assert m.tokenizer().encode("hello world") == ref.tokenizer().encode("hello world")


def test_split_gguf_missing_or_renamed_part_is_a_clear_error(tmp_path):
    import os
    _, parts = _split(tmp_path)
    os.rename(parts[2], parts[2] + ".away")
    for part in (parts[0], parts[3]):
        with pytest.raises(DllamaError, match=f"part 3 of 4 is missing: {parts[2]}"):
            open_model(part)
    renamed = str(tmp_path / "renamed.gguf")
    os.rename(parts[1], renamed)
    with pytest.raises(DllamaError, match="part 2 of a 4-part split GGUF, but its name"):
        open_model(renamed)


def test_split_gguf_runs_like_the_whole_file(tmp_path):
    from dllama_mpi.comm import SerialComm
    from tiny import our_logits
    whole, parts = _split(tmp_path)
    ids = [1, 17, 42, 99, 3]
    np.testing.assert_array_equal(our_logits(SerialComm(), parts[1], ids, weights="auto"),
                                  our_logits(SerialComm(), whole, ids, weights="auto"))
