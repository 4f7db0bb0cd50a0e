"""`convert`: any readable model (GGUF, .m, HF folder, .h5) -> our HDF5 store or .m + .t.

    python -m dllama_mpi convert SRC -o model.h5 [--weights-float-type q40|f16|f32]
    python -m dllama_mpi convert SRC --to dllama -o model.m [--weights-float-type q40|f32]
"""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import DllamaError
from ..formats import open_model

TARGETS = ("hdf5", "dllama")


def default_output(src: str, to: str, weights: str) -> str:
    stem = os.path.splitext(os.path.basename(os.path.normpath(src)))[0]
    return f"{stem}-{weights}.h5" if to == "hdf5" else f"{stem}-{weights}.m"


def convert(src_path: str, out_path: str | None = None, weights_float_type: str = "q40",
            tokenizer_path: str | None = None, to: str | None = None,
            progress: bool = True) -> list[str]:
    """Convert; returns the paths written (the .t too for --to dllama)."""
    if to is None:
        to = "dllama" if out_path and out_path.endswith(".m") else "hdf5"
    if to not in TARGETS:
        raise DllamaError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    out_path = out_path or default_output(src_path, to, weights_float_type)
    if os.path.abspath(out_path) == os.path.abspath(src_path):
        raise DllamaError("the output would overwrite the source")
    model = open_model(src_path, tokenizer_path)
    try:
        if to == "hdf5":
            from ..formats.hdf5 import write_h5
            return [write_h5(model, out_path, weights_float_type, progress=progress,
                             source=os.path.abspath(src_path))]
        return _to_dllama(model, out_path, weights_float_type, progress)
    finally:
        model.close()


def _to_dllama(model, out_path: str, weights: str, progress: bool) -> list[str]:
    from ..formats.dllama import tensor_layout, write_dllama_m, write_dllama_t
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(tensor_layout(model.config, "F32")), desc="converting",
                   unit="tensor", file=sys.stderr, leave=False)
    try:
        written = [write_dllama_m(model, out_path, weights,
                                  progress=bar.update if bar is not None else None)]
    finally:
        if bar is not None:
            bar.close()
    try:
        tok = model.tokenizer()
    except DllamaError as e:
        print(f"warning: no tokenizer written ({e})", file=sys.stderr)
        return written
    written.append(write_dllama_t(tok, os.path.splitext(out_path)[0] + ".t"))
    return written


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="GGUF file, .m file, Hugging Face folder or .h5 store")
    p.add_argument("-o", "--output", default=None, help="output path (.h5, or .m with --to dllama)")
    p.add_argument("--to", choices=TARGETS, default=None,
                   help="output format (default: from the output name; hdf5)")
    p.add_argument("--weights-float-type", default="q40", choices=("q40", "q80", "f16", "f32"),
                   help="weight type written (q80: .m only)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (.t or tokenizer.json) to store")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    paths = convert(args.src, args.output, args.weights_float_type, args.tokenizer, args.to,
                    progress=not args.no_progress)
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
