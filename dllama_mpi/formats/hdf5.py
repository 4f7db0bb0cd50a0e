"""Our HDF5 model store (h5py): one dataset per tensor, config and tokenizer inside.

Layout (format version 1; `h5ls -r model.h5`, `h5dump -H model.h5` show it):
  /                       attrs: format="dllama_mpi", format_version=1, config (ModelConfig as
                          JSON), rope_scaling (JSON or ""), source, plus the config fields
                          one by one for the eye (dim, n_layers, ...)
  /tensors/<name>         canonical names (embedding, layers.0.wq, ..., final_norm, wcls);
                          float32/float16 [out, in] values, or uint8 [out, bytes per row] of
                          GGML blocks for quantised types; attrs ggml_type, shape (logical)
  /tokenizer              attrs bos_id, eos_ids, add_bos, special_tokens (JSON);
                          datasets tokenizer_json (HF tokenizers JSON), chat_template
q/k rows are in interleaved-pair rope order, as GGUF. Matrices are chunked along the axis a
rank splits them on (out-split: bands of 32*k rows; in-split wo/w2: all rows x one 32-block
column), so a rank's slice is a hyperslab touching only its own chunks.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from ..config import ModelConfig
from ..errors import DllamaError
from .base import HDF5_SIGNATURE, LazyRows, Tensor, expected_shapes

FORMAT, FORMAT_VERSION = "dllama_mpi", 1
# GGML types a store holds (quantised ones as their block bytes)
STORE_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")
# --weights-float-type -> (layer matrices, embedding and output matrix); "auto" keeps every
# tensor's type from the file (types a store cannot hold become F32: exact)
TARGETS = {"auto": (None, None), "q40": ("Q4_0", "Q8_0"), "q41": ("Q4_1", "Q8_0"),
           "q80": ("Q8_0", "Q8_0"), "f16": ("F16", "F16"), "f32": ("F32", "F32")}
IN_SPLIT = (".wo", ".w2")
CHUNK_BYTES = 1 << 20


def _storage(type_name: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], np.dtype]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    if type_name == "F32":
        return shape, np.dtype(np.float32)
    if type_name == "F16":
        return shape, np.dtype(np.float16)
    values, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return (shape[0], shape[1] // values * nbytes), np.dtype(np.uint8)


def _chunks(name: str, type_name: str, stored: tuple[int, ...], itemsize: int):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    if len(stored) == 1:
        return None
    rows, width = stored
    if name.endswith(IN_SPLIT):  # column bands: one 32-block of columns, all rows
        block = 32 if type_name in ("F32", "F16") else \
            GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][1]
        return (rows, min(width, block))
    k = max(1, CHUNK_BYTES // max(1, 32 * width * itemsize))
    return (min(rows, 32 * k), width)


def _target_type(name: str, shape, src_type: str, weights: str) -> str:
    if len(shape) == 1:
        return "F32"
    if weights == "auto":
        return src_type if src_type in STORE_TYPES else "F32"
    layer_t, outer_t = TARGETS[weights]
    t = outer_t if name in ("embedding", "wcls") else layer_t
    if t not in ("F32", "F16") and shape[1] % 32:
        return "F16" if weights != "f32" else "F32"  # rows not whole blocks (tiny models)
    if (weights, src_type) in (("q40", "Q4_0"), ("q41", "Q4_1")):
        return src_type  # already that 4-bit type: kept bit for bit (embedding and output too)
    return t


def lossless(src_type: str, dst_type: str) -> bool:
    """Whether storing a src_type tensor as dst_type keeps its values exactly (the same type,
    or f32, which holds every value of the other types)."""
    return dst_type == src_type or dst_type == "F32"


def plan_types(model, weights_float_type: str = "auto") -> dict[str, tuple[str, str]]:
    """Canonical tensor name -> (its type in the file, its type in the store)."""
    if weights_float_type not in TARGETS:
        raise DllamaError(f"HDF5 weight type must be one of {', '.join(TARGETS)}, "
                          f"got {weights_float_type!r}")
    out = {}
    for name, shape in expected_shapes(model.config).items():
        src = model.tensor(name).type
        out[name] = (src, _target_type(name, shape, src, weights_float_type))
    return out


def write_h5(model, out_path: str, weights_float_type: str = "auto", progress: bool = True,
             source: str = "", checkpoint=None) -> str:
    """Write any open model (base.py interface) to our HDF5 store; atomically. auto keeps
    every tensor's type (plan_types says what becomes what). checkpoint(): called between
    pieces of work, where stopping is safe (it may raise: the temporary file is removed)."""
    import h5py

    from .dllama import convert_rows
    c = model.config
    shapes = expected_shapes(c)
    types = plan_types(model, weights_float_type)
    tok = None
    try:
        tok = model.tokenizer()
    except DllamaError as e:
        print(f"warning: no tokenizer stored ({e})", file=sys.stderr)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    bar = _bar(len(shapes), progress)
    try:
        # objects in the HDF5 1.8 encodings: readable by the h5ls/h5dump of any site (with
        # libver="latest", h5py's HDF5 2.0 wrote the boolean attributes in an encoding that
        # h5dump 1.10 could not read: "error getting attribute information", exit 1)
        with h5py.File(tmp, "w", libver=("v108", "latest")) as f:
            _write_attrs(f, c, getattr(model, "rope_scaling", None), source or str(model.path))
            g = f.create_group("tensors")
            for name, shape in shapes.items():
                src = model.tensor(name)
                t = types[name][1]
                stored, dtype = _storage(t, shape)
                ds = g.create_dataset(name, shape=stored, dtype=dtype,
                                      chunks=_chunks(name, t, stored, dtype.itemsize))
                ds.attrs["ggml_type"] = t
                ds.attrs["shape"] = np.asarray(shape, np.int64)
                r0 = 0
                for part in convert_rows(src, t):
                    part = np.asarray(part).reshape((-1,) + stored[1:]) if len(stored) == 2 \
                        else np.asarray(part)
                    ds[r0:r0 + part.shape[0]] = part
                    r0 += part.shape[0]
                    if checkpoint is not None:
                        checkpoint()
                if bar is not None:
                    bar.update(1)
            if tok is not None:
                _write_tokenizer(f, tok)
        if checkpoint is not None:
            checkpoint()
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        if bar is not None:
            bar.close()
    return out_path


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc="converting", unit="tensor", file=sys.stderr, leave=False,
                disable=not sys.stderr.isatty())


def _write_attrs(f, c: ModelConfig, rope_scaling, source: str) -> None:
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["config"] = json.dumps(c.to_dict())
    f.attrs["rope_scaling"] = json.dumps(rope_scaling) if rope_scaling else ""
    f.attrs["source"] = source
    for k, v in c.to_dict().items():
        if k != "rope_freq_factors":
            f.attrs[k] = v


def _write_tokenizer(f, tok) -> None:
    g = f.create_group("tokenizer")
    g.attrs["bos_id"] = -1 if tok.bos_id is None else tok.bos_id
    g.attrs["eos_ids"] = np.asarray(tok.eos_ids, np.int64)
    g.attrs["add_bos"] = bool(tok.add_bos)
    g.attrs["vocab_size"] = tok.vocab_size
    g.attrs["special_tokens"] = json.dumps(tok.special_tokens)
    g.create_dataset("tokenizer_json", data=tok.hf_tokenizer.to_str())
    g.create_dataset("chat_template", data=tok.chat_template or "")
    scores = getattr(tok, "scores", None)
    if scores is not None:
        g.create_dataset("scores", data=np.asarray(scores, np.float32))


class H5Model:
    """An open HDF5 model store, checked up front."""

    format = "hdf5"

    def __init__(self, path: str):
        import h5py
        if not os.path.isfile(path):
            raise DllamaError(f"model file not found: {path}")
        with open(path, "rb") as fh:
            if fh.read(8) != HDF5_SIGNATURE:
                raise DllamaError(f"{path} is not an HDF5 file")
        try:
            self.file = h5py.File(path, "r")
        except OSError as e:
            raise DllamaError(f"cannot open HDF5 file {path}: {e} (truncated or corrupt?)") from None
        self.path = path
        a = self.file.attrs
        if a.get("format") != FORMAT:
            raise DllamaError(f"{path}: not a dllama_mpi model store (format attribute "
                              f"{a.get('format')!r})")
        if int(a.get("format_version", -1)) != FORMAT_VERSION:
            raise DllamaError(f"{path}: model store version {a.get('format_version')}, this "
                              f"program reads version {FORMAT_VERSION}")
        try:
            self.config = ModelConfig.from_dict(json.loads(a["config"]))
        except (KeyError, TypeError, ValueError) as e:
            raise DllamaError(f"{path}: bad config attribute ({e})") from None
        self.config.check()
        rs = a.get("rope_scaling", "")
        self.rope_scaling = json.loads(rs) if rs else None
        self.tensors = self._check_tensors()

    def _check_tensors(self) -> dict[str, Tensor]:
        g = self.file.get("tensors")
        if g is None:
            raise DllamaError(f"{self.path}: no /tensors group")
        expected = expected_shapes(self.config)
        unknown = sorted(set(g.keys()) - set(expected))
        if unknown:
            raise DllamaError(f"{self.path}: unexpected tensors {unknown[:6]}")
        out = {}
        for name, shape in expected.items():
            ds = g.get(name)
            if ds is None:
                raise DllamaError(f"{self.path}: missing tensor {name}")
            t = str(ds.attrs.get("ggml_type", ""))
            if t not in ("F32", "F16", "Q4_0", "Q4_1", "Q8_0"):
                raise DllamaError(f"{self.path}: tensor {name} has unsupported type {t!r}")
            logical = tuple(int(v) for v in ds.attrs.get("shape", ()))
            if logical != shape:
                raise DllamaError(f"{self.path}: tensor {name} has shape {logical}, "
                                  f"expected {shape}")
            stored, dtype = _storage(t, shape)
            if tuple(ds.shape) != stored or ds.dtype != dtype:
                raise DllamaError(f"{self.path}: tensor {name} is stored as {ds.shape} "
                                  f"{ds.dtype}, expected {stored} {dtype}")
            out[name] = Tensor(name, t, shape, _rows(g, name, ds.shape, ds.dtype))
        return out

    def tensor(self, name: str) -> Tensor:
        return self.tensors[name]

    def preferred_weight_type(self) -> str:
        types = [t.type for n, t in self.tensors.items() if n.startswith("layers.") and
                 len(t.shape) == 2]
        common = max(set(types), key=types.count)
        return {"Q4_1": "q41", "Q4_0": "q40", "Q8_0": "q40"}.get(common, "f32")

    def output_type(self) -> str:
        return self.tensor("embedding" if self.config.tied_embeddings else "wcls").type

    def tokenizer(self):
        from tokenizers import Tokenizer as HFTokenizer

        from ..tokenizer import Tokenizer
        g = self.file.get("tokenizer")
        if g is None:
            raise DllamaError(f"{self.path}: no tokenizer stored (give --tokenizer)")
        hf = HFTokenizer.from_str(_text(g["tokenizer_json"][()]))
        bos = int(g.attrs["bos_id"])
        tok = Tokenizer(hf, vocab_size=int(g.attrs["vocab_size"]),
                        bos_id=None if bos < 0 else bos,
                        eos_ids=[int(i) for i in g.attrs["eos_ids"]],
                        add_bos=bool(g.attrs["add_bos"]),
                        chat_template=_text(g["chat_template"][()]) or None,
                        special_tokens=json.loads(g.attrs["special_tokens"]))
        if "scores" in g:
            tok.scores = [float(v) for v in g["scores"][()]]
        return tok

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _rows(group, name: str, shape, dtype):
    """The dataset's rows, read on demand. HDF5 gives every open dataset a chunk cache
    (1 MiB by default) holding the last chunks read: with every tensor's dataset kept open
    the caches add up to more than a small model's shard. So a band (a rank's slice, read
    once) is read through a handle opened for it and closed after; only small reads
    (embedding rows while generating) keep one open handle, whose cache then holds one
    chunk. (No cache at all is worse: the column bands of wo/w2 are then read row by row.)"""
    kept = []

    def read(ds, start, stop, cols):
        return ds[start:stop] if cols is None else ds[start:stop, cols]

    def fetch(start, stop, cols):
        if stop - start <= 64:
            if not kept:
                kept.append(group[name])
            return read(kept[0], start, stop, cols)
        ds = group[name]
        try:
            return read(ds, start, stop, cols)
        finally:
            ds.id.close()
    return LazyRows(shape, dtype, fetch)
