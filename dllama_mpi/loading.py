"""Model file -> this rank's weights.

The root reads every tensor, cuts each rank's slice (shard.py), converts it to the
runtime type and sends it with MPI; workers receive into arrays of the size of their
slice and never open the model file. Q40 slices travel as GGML Q4_0 block bytes and
are repacked into the kernel layout by the rank that uses them.
"""
from __future__ import annotations

import numpy as np

from .config import ModelConfig, RunConfig
from .errors import DllamaError
from .model import LayerWeights, ShardWeights
from .quant import (Q40_BLOCK_BYTES, Q41_BLOCK_BYTES, Q80_BLOCK_BYTES, QK, Q40Matrix, Q41Matrix,
                    Q80Matrix, quantize_q40, quantize_q41, quantize_q80)
from .quant.kquants import dequantize, to_runtime_blocks
from .shard import Range, is_matrix, layer_tensors, plan, slice_shape, tensor_specs


def _file_name(config: ModelConfig, name: str) -> str:
    return "embedding" if name == "wcls" and config.tied_embeddings else name


def convert_slice(tensor, kind: str, rng: Range | None, target: str) -> np.ndarray:
    """Read a rank's slice of a file tensor and convert it to f32 values or the target's
    GGML block bytes (Q4_0 -> q40, Q4_1 -> q41, Q8_0 -> q80 pass through bit for bit; Q4_K
    -> q41 keeps its nibbles: quant/kquants.py). A band of columns is read as the file's
    whole blocks around it (256 values for K-quants), converted, then cut."""
    if kind == "rep":
        return dequantize(tensor.read(), tensor.type)
    split = kind.split(":")[0]
    if split == "vec":  # vectors stay f32 whatever the weight type
        return dequantize(tensor.read(rows=rng), tensor.type)
    if split == "out":
        return _convert(tensor.read(rows=rng), tensor.type, target)
    block = tensor.block[0]
    lo, hi = rng.start // block * block, -(-rng.stop // block) * block
    raw = tensor.read(cols=Range(lo, hi))
    if (lo, hi) == (rng.start, rng.stop):
        return _convert(raw, tensor.type, target)
    a, b = rng.start - lo, rng.stop - lo
    if target in BLOCK_FORMATS and a % QK == 0 and b % QK == 0:  # every conversion is per 32
        nbytes = BLOCK_FORMATS[target][1]
        return np.ascontiguousarray(_convert(raw, tensor.type, target)[:, a // QK * nbytes:
                                                                          b // QK * nbytes])
    values = np.ascontiguousarray(dequantize(raw, tensor.type)[:, a:b])
    return _QUANTIZE[target](values) if target in _QUANTIZE else values


def _to_f16(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        out = values.astype(np.float16)
    if not np.isfinite(out).all() and np.isfinite(values).all():
        raise ValueError("values beyond the float16 range: use --weights-float-type f32")
    return out


_QUANTIZE = {"q40": quantize_q40, "q41": quantize_q41, "q80": quantize_q80, "f16": _to_f16}


def _convert(raw: np.ndarray, type_name: str, target: str) -> np.ndarray:
    """Whole rows (or whole-block columns) of a file tensor -> the target's form."""
    direct = to_runtime_blocks(raw, type_name, target)
    if direct is not None:
        return direct
    values = dequantize(raw, type_name)
    return _QUANTIZE[target](values) if target in _QUANTIZE else values


# runtime weight type -> (class built from GGML block bytes, bytes per block)
BLOCK_FORMATS = {"q40": (Q40Matrix, Q40_BLOCK_BYTES), "q41": (Q41Matrix, Q41_BLOCK_BYTES),
                 "q80": (Q80Matrix, Q80_BLOCK_BYTES)}


def _runtime(arr: np.ndarray, kind: str, target: str):
    if is_matrix(kind) and target in BLOCK_FORMATS:
        return BLOCK_FORMATS[target][0].from_blocks(arr)
    return arr


def _wire_shape(shape: tuple[int, ...], kind: str, target: str):
    if is_matrix(kind) and target in BLOCK_FORMATS:
        return (shape[0], shape[1] // QK * BLOCK_FORMATS[target][1]), np.uint8
    return shape, (np.float16 if is_matrix(kind) and target == "f16" else np.float32)


def load_shard(comm, model, config: ModelConfig, run: RunConfig, progress: bool = True,
               direct: bool = False):
    """Every rank calls this. Scatter (default): `model` (an open model file) is needed on
    the root only, which reads and sends every slice. Direct: every rank has `model` open
    and reads only its own slices; nothing crosses MPI.
    Returns this rank's ShardWeights."""
    plans = [plan(config, r, comm.size) for r in range(comm.size)]
    me = plans[comm.rank]
    arrays: dict[str, np.ndarray] = {}  # slices read or received, until their layer is whole
    layers: list[LayerWeights] = []
    names = layer_tensors(config)
    last = "." + names[-1]                # tensor_specs sends a layer's tensors together
    specs = tensor_specs(config)
    bar = _progress(len(specs), progress and comm.is_root)
    for name, kind in specs:
        target = run.matrix_type(name) if is_matrix(kind) else "f32"
        if direct or comm.is_root:
            tensor = model.tensor(_file_name(config, name))
            for r in ([comm.rank] if direct else range(comm.size)):
                rng = None if kind == "rep" else plans[r].range(kind.split(":")[1])
                try:
                    arr = convert_slice(tensor, kind, rng, target)
                except ValueError as e:
                    raise DllamaError(f"cannot convert tensor {tensor.name}: {e}") from None
                if r == comm.rank:
                    arrays[name] = arr
                else:
                    comm.send_array(arr, r)
        else:
            shape, dtype = _wire_shape(slice_shape(config, name, kind, me), kind, target)
            arrays[name] = comm.recv_array(np.empty(shape, dtype))
        if name.startswith("layers.") and name.endswith(last):  # a whole layer: runtime form
            index = int(name.split(".")[1])
            slices = {n: arrays.pop(f"layers.{index}.{n}") for n in names}
            layers.append(LayerWeights.from_slices(
                slices, lambda rows, type_: _runtime(rows, "out:", type_),
                lambda short, index=index: run.matrix_type(f"layers.{index}.{short}")))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    wcls = _runtime(arrays["wcls"], "out:vocab", run.matrix_type("wcls"))
    weights = ShardWeights(layers=layers, final_norm=arrays["final_norm"], wcls=wcls)
    return weights


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    import sys

    from tqdm import tqdm
    return tqdm(total=total, desc="loading", unit="tensor", file=sys.stderr,
                disable=not sys.stderr.isatty(), leave=False)
