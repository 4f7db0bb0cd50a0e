"""`convert`: any readable model (GGUF, .m, HF folder, .h5, a known name) -> our HDF5 store
or Distributed Llama's .m + .t.

    python -m dllama_mpi convert SRC -o model.h5 [--weights-float-type auto|q40|q41|q80|f16|f32]
    python -m dllama_mpi convert SRC --to dllama -o model.m [--weights-float-type auto|q40|q80|f16|f32]

A signal (SIGINT, SIGTERM) is acted on between pieces of the writing, never inside h5py or
a half-written tensor: the temporary file is removed and nothing is left under the output's
name.

auto (the default) keeps what the file has: every tensor of an .h5 store keeps its type
(Q4_1 stays Q4_1, bit for bit). An .m file holds one weight type: auto picks the file's when
it can (Q4_0, Q8_0, F16, F32), else the one that loses least (Q8_0), and says so. Any other
choice that changes values is allowed, and printed as lossy.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

from .. import registry
from ..errors import DllamaError
from ..formats import expected_shapes, open_model
from ..runtime import interrupt

TARGETS = ("hdf5", "dllama")
H5_TYPES = ("auto", "q40", "q41", "q80", "f16", "f32")
M_TYPES = ("auto", "q40", "q80", "f16", "f32")
_M_GGML = {"q40": "Q4_0", "q80": "Q8_0", "f16": "F16", "f32": "F32"}


def default_output(src: str, to: str, weights: str) -> str:
    stem = os.path.splitext(os.path.basename(os.path.normpath(src)))[0]
    tail = "" if weights == "auto" else f"-{weights}"
    return f"{stem}{tail}.h5" if to == "hdf5" else f"{stem}{tail}.m"


def convert(src_path: str, out_path: str | None = None, weights_float_type: str = "auto",
            tokenizer_path: str | None = None, to: str | None = None,
            progress: bool = True, report=None) -> list[str]:
    """Convert; returns the paths written (the .t too for --to dllama). src_path may be a
    known model name. report(line): told what each tensor type becomes (None: quiet)."""
    if to is None:
        to = "dllama" if out_path and out_path.endswith(".m") else "hdf5"
    if to not in TARGETS:
        raise DllamaError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    allowed = H5_TYPES if to == "hdf5" else M_TYPES
    if weights_float_type not in allowed:
        raise DllamaError(f"--weights-float-type {weights_float_type} cannot be written to "
                          f"{'an .h5 store' if to == 'hdf5' else 'an .m file'} (one of "
                          f"{', '.join(allowed)})")
    src_path = registry.resolve(src_path)
    out_path = out_path or default_output(src_path, to, weights_float_type)
    if os.path.abspath(out_path) == os.path.abspath(src_path):
        raise DllamaError("the output would overwrite the source")
    check_output(out_path)
    if to == "dllama":
        check_output(os.path.splitext(out_path)[0] + ".t")
    if report is not None:
        report(f"converting {src_path} to {out_path} ({'HDF5 store' if to == 'hdf5' else '.m + .t'}, "
               f"weights {weights_float_type})")
    model = open_model(src_path, tokenizer_path)
    try:
        if to == "hdf5":
            from ..formats.hdf5 import plan_types, write_h5
            if report is not None:
                for line in describe(plan_types(model, weights_float_type)):
                    report(line)
            with interrupt.deferred():
                return [write_h5(model, out_path, weights_float_type, progress=progress,
                                 source=os.path.abspath(src_path), checkpoint=interrupt.check)]
        weights = m_weight_type(model) if weights_float_type == "auto" else weights_float_type
        if report is not None:
            auto = weights_float_type == "auto"
            for line in describe(_m_plan(model, weights),
                                 f"{weights} (an .m file holds one weight type)" if auto else "",
                                 "an .m file cannot hold the file's types; an .h5 store keeps "
                                 "them" if auto else "--weights-float-type auto loses least"):
                report(line)
        with interrupt.deferred():
            return _to_dllama(model, out_path, weights, progress)
    finally:
        model.close()


def check_output(path: str) -> None:
    """A clear error, before anything is read, when path cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise DllamaError(f"cannot write {path}: it is a directory (give a file name)")
    if not os.path.isdir(folder):
        raise DllamaError(f"cannot write {path}: the folder {os.path.dirname(path) or folder} "
                          "does not exist")
    probe = os.path.join(folder, f".dllama-write-check-{os.getpid()}")
    try:                                    # access() is not enough: root, sysfs, read-only
        with open(probe, "wb"):             # mounts and ACLs only show when one tries
            pass
    except OSError as e:
        raise DllamaError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(probe):
            os.unlink(probe)


def m_weight_type(model) -> str:
    """The .m weight type that keeps the file's matrices as they are, or loses least."""
    shapes = expected_shapes(model.config)
    types = {model.tensor(n).type for n, s in shapes.items() if n.startswith("layers.") and len(s) == 2}
    if len(types) == 1:
        t = types.pop()
        for m, ggml in _M_GGML.items():
            if ggml == t:
                return m
        if t == "BF16":
            return "f32"
    return "q80"


def _m_plan(model, weights: str) -> dict[str, tuple[str, str]]:
    """name -> (file type, .m type) for the matrices (the .m keeps vectors in f32)."""
    from ..formats.dllama import FLOAT_TYPES, WRITE_TYPES, tensor_layout
    wtype = FLOAT_TYPES[WRITE_TYPES[weights]]
    c = model.config
    out = {}
    for name, t, shape in tensor_layout(c, wtype):
        src = model.tensor("embedding" if name == "wcls" and c.tied_embeddings else name)
        out[name] = (src.type, t)
    return out


def describe(plan: dict[str, tuple[str, str]], why: str = "",
             hint: str = "--weights-float-type auto keeps the file's types") -> list[str]:
    """Lines saying what each file type becomes: kept, widened (exact) or lossy."""
    from ..formats.hdf5 import lossless
    counts = collections.Counter(plan.values())
    kept = [f"{s} x{n}" for (s, d), n in sorted(counts.items()) if s == d]
    exact = [f"{s} -> {d} x{n}" for (s, d), n in sorted(counts.items()) if s != d and lossless(s, d)]
    lossy = [f"{s} -> {d} x{n}" for (s, d), n in sorted(counts.items()) if not lossless(s, d)]
    lines = []
    if why:
        lines.append(f"weights: {why}")
    if kept:
        lines.append(f"kept as in the file: {', '.join(kept)}")
    if exact:
        lines.append(f"widened (exact): {', '.join(exact)}")
    if lossy:
        lines.append(f"lossy: {', '.join(lossy)} (values change; {hint})")
    return lines


def _to_dllama(model, out_path: str, weights: str, progress: bool) -> list[str]:
    from ..formats.dllama import tensor_layout, write_dllama_m, write_dllama_t
    from ..tokenizer.dllama_t import peer_split_warning
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(tensor_layout(model.config, "F32")), desc="converting",
                   unit="tensor", file=sys.stderr, leave=False, disable=not sys.stderr.isatty())
    try:
        written = [write_dllama_m(model, out_path, weights,
                                  progress=bar.update if bar is not None else None,
                                  checkpoint=interrupt.check)]
    finally:
        if bar is not None:
            bar.close()
    try:
        tok = model.tokenizer()
    except DllamaError as e:
        print(f"warning: no tokenizer written ({e})", file=sys.stderr)
        return written
    interrupt.check()
    written.append(write_dllama_t(tok, os.path.splitext(out_path)[0] + ".t"))
    warning = peer_split_warning(tok)
    if warning:
        print(warning, file=sys.stderr)
    return written


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="GGUF file, .m file, Hugging Face folder, .h5 store, or a known "
                   f"model name ({', '.join(registry.KNOWN_MODELS)})")
    p.add_argument("-o", "--output", default=None,
                   help="output path (.h5, or .m with --to dllama); default: the source's "
                   "name with .h5 (or .m) in the current folder")
    p.add_argument("--to", choices=TARGETS, default=None,
                   help="output format (default: from the output name; hdf5)")
    p.add_argument("--weights-float-type", default="auto", choices=H5_TYPES,
                   help="weight type written; auto: the file's own (lossless); others may lose "
                   "precision and say so (q41: .h5 only)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (.t or tokenizer.json) to store")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    try:
        paths = convert(args.src, args.output, args.weights_float_type, args.tokenizer, args.to,
                        progress=not args.no_progress,
                        report=lambda line: print(line, file=sys.stderr))
    except OSError as e:                    # a disk that fills up or goes away while writing
        raise DllamaError(f"cannot write {e.filename or args.output}: {e.strerror or e}") from None
    for p in paths:
        print(f"wrote {p} ({os.path.getsize(p) / 2**20:.1f} MiB)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dllama_mpi convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    try:
        return run(p.parse_args(argv))
    except DllamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
