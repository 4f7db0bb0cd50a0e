"""Per-rank K/V storage: this rank's KV heads, every layer, every position, for n_slots
sequences decoded together (one slot per sequence), as f32 or f16.

- memory: two numpy arrays, every page written at start (`commit`), so that a cache the node
  cannot hold fails at start, not hours later at a far position;
- disk: two memory-mapped files per rank, `rank<R>.k` and `rank<R>.v`, in a folder named by
  the job (`dllama-kv-<job>`) under the directory asked for, or under the node-local
  temporary directory ($SLURM_TMPDIR, $TMPDIR, /tmp). Their blocks are reserved up front
  (posix_fallocate): a disk too small is an error at start, never a SIGBUS in the middle of a
  run. Each file is unlinked as soon as it is mapped (the pages live until the process
  ends), and the job folder is removed once the node's ranks have made theirs: whatever
  ends the job -- normal exit, error, SIGTERM, SIGINT, even SIGKILL -- nothing is left on
  disk. Folders of earlier jobs that died in that short window are removed by the next job
  (`remove_stale`).

Knows nothing of MPI or models; errors are DllamaError with the path and the reason.
"""
from __future__ import annotations

import errno
import os
import re
import socket
import time

import numpy as np

from .errors import DllamaError

FLOAT_TYPES = {"f32": np.float32, "f16": np.float16}
STORAGES = ("memory", "disk")
FOLDER_PREFIX = "dllama-kv-"
STALE_SECONDS = 60.0   # a job folder this old with no live file in it is a dead job's
_FILE_RE = re.compile(r"rank\d+\.[kv]$")


def node_tmpdir() -> str:
    """The node-local temporary directory: SLURM's job folder where set, else $TMPDIR, /tmp."""
    for var in ("SLURM_TMPDIR", "TMPDIR"):
        d = os.environ.get(var)
        if d and os.path.isdir(d):
            return d
    return "/tmp"


def job_tag() -> str:
    """A name no other job on any node shares: SLURM's job and step, the host and pid of the
    process calling this (the root, which sends it to every rank), and random bits."""
    parts = []
    if os.environ.get("SLURM_JOB_ID"):
        parts.append(f"slurm{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '0')}")
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname().split(".")[0]) or "host"
    parts += [host, str(os.getpid()), os.urandom(3).hex()]
    return "-".join(parts)


def check_directory(base: str) -> None:
    """A clear DllamaError unless `base` is an existing, writable directory."""
    if not os.path.exists(base):
        raise DllamaError(f"--kv-cache-dir {base} does not exist (create it first)")
    if not os.path.isdir(base):
        raise DllamaError(f"--kv-cache-dir {base} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise DllamaError(f"--kv-cache-dir {base} is not writable")


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def remove_stale(base: str, now: float | None = None) -> list[str]:
    """Remove the job folders under `base` left by dead jobs: folders named dllama-kv-*,
    untouched for STALE_SECONDS, holding only our rank files (removed first). A live job's
    folder is never that old (its files are unlinked within milliseconds and the folder
    removed with them). Returns the folders removed; errors (another user's folder) are
    ignored."""
    now = time.time() if now is None else now
    removed = []
    try:
        entries = os.listdir(base)
    except OSError:
        return removed
    for name in entries:
        if not name.startswith(FOLDER_PREFIX):
            continue
        folder = os.path.join(base, name)
        try:
            if not os.path.isdir(folder) or now - os.stat(folder).st_mtime < STALE_SECONDS:
                continue
            files = os.listdir(folder)
            if any(not _FILE_RE.match(f) for f in files):
                continue                       # not only ours: leave it
            for f in files:
                os.unlink(os.path.join(folder, f))
            os.rmdir(folder)
            removed.append(folder)
        except OSError:
            continue
    return removed


class KVCache:
    def __init__(self, n_layers: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 directory: str | None = None, tag: str = "rank0", n_slots: int = 1,
                 float_type: str = "f32", storage: str | None = None, job: str | None = None,
                 commit: bool = False):
        """storage: "memory" or "disk" (None: disk when a directory is given). directory:
        where disk storage makes its job folder (None: node_tmpdir()). job: the job's tag
        (job_tag(), made on the root and shared); tag: this rank's file name stem.
        commit: write every page of a memory cache now (start-up does; tests need not)."""
        if float_type not in FLOAT_TYPES:
            raise DllamaError(f"--kv-cache-float-type must be one of {', '.join(FLOAT_TYPES)}, "
                              f"got {float_type!r}")
        storage = storage or ("disk" if directory is not None else "memory")
        if storage not in STORAGES:
            raise DllamaError(f"--kv-cache-storage must be one of {', '.join(STORAGES)}, "
                              f"got {storage!r}")
        shape = (n_layers, n_slots, max_seq_len, n_kv_heads, head_dim)  # [L, slot, S, kv, hd]
        dtype = np.dtype(FLOAT_TYPES[float_type])
        self.max_seq_len, self.n_slots = max_seq_len, n_slots
        self.float_type, self.storage = float_type, storage
        self.folder: str | None = None
        if storage == "memory":
            self.k = np.zeros(shape, dtype)
            self.v = np.zeros(shape, dtype)
            if commit:          # calloc'd pages are only promised: take them now
                self.k.fill(0)
                self.v.fill(0)
            return
        base = directory if directory is not None else node_tmpdir()
        check_directory(base)
        remove_stale(base)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        self.folder = os.path.join(base, FOLDER_PREFIX + (job or job_tag()))
        try:
            self._make_folder(base)
            free = free_bytes(base)
            if 2 * nbytes > free:
                raise DllamaError(self._no_room(base, 2 * nbytes, free))
            self.k, self.v = (self._mapped(os.path.join(self.folder, f"{tag}.{n}"), shape,
                                           dtype, nbytes, base) for n in "kv")
        finally:
            self._remove_folder()

    def _make_folder(self, base: str) -> None:
        try:
            os.makedirs(self.folder, exist_ok=True)
        except FileExistsError:
            # makedirs found the folder made by another rank of the node, which then removed
            # it before makedirs could see it was a folder: _mapped makes it again
            pass
        except OSError as e:
            raise DllamaError(f"cannot create the KV cache in {base}: {e.strerror}") from None

    @staticmethod
    def _no_room(base: str, need: int, free: int) -> str:
        return (f"the KV cache needs {need / 2**20:.1f} MiB on this rank, {base} has "
                f"{free / 2**20:.1f} MiB free (lower --max-seq-len or --parallel, use "
                f"--kv-cache-float-type f16, or another --kv-cache-dir)")

    def _mapped(self, path: str, shape, dtype, nbytes: int, base: str) -> np.ndarray:
        """A new file of nbytes, its blocks reserved, mapped, then unlinked."""
        for attempt in range(20):
            try:
                self._make_folder(base)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                break
            except FileNotFoundError as e:     # another rank removed the folder meanwhile
                if attempt == 19:
                    raise DllamaError(f"cannot create the KV cache in {base}: {e.strerror}") \
                        from None
            except OSError as e:
                raise DllamaError(f"cannot create the KV cache in {base}: {e.strerror}") \
                    from None
        try:
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise DllamaError(self._no_room(base, 2 * nbytes, free_bytes(base))) \
                        from None
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise DllamaError(f"cannot create the KV cache in {base}: {e.strerror}") \
                        from None
                os.ftruncate(fd, nbytes)       # no fallocate here: a sparse file
            return np.asarray(np.memmap(path, dtype, "r+", shape=shape))  # a plain view
        finally:
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass

    def _remove_folder(self) -> None:
        if self.folder is not None:
            try:
                os.rmdir(self.folder)          # the node's last rank to get here removes it
            except OSError:
                pass

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def layer(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """K and V of one layer: [slot, S, kv, hd] views."""
        return self.k[index], self.v[index]

    def copy_prefix(self, src: int, dst: int, n_positions: int) -> None:
        """Positions 0..n_positions-1 of slot src, every layer, into slot dst."""
        self.k[:, dst, :n_positions] = self.k[:, src, :n_positions]
        self.v[:, dst, :n_positions] = self.v[:, src, :n_positions]

    def close(self) -> None:
        """Nothing is left on disk already; the folder once more, in case a rank of the node
        made its files after this one looked."""
        self._remove_folder()
