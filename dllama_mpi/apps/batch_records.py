"""The output files of `batch`: one JSON line per request, written whole in one write() call:
  {"id": "batch_req_…", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}
`error` is null for a 200 answer, else {"code", "message"} (the body is then the OpenAI error
object). The keys come in that order, compact, so the resume scan reads custom_id and the
error code without parsing the body. Here: the records, the resume scan (a torn last line cut
off, a file that is not ours refused), the locked append-only writer, the rewrite in input
order.
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from ..errors import DllamaError
from .batch_requests import RequestError

DUPLICATE = "duplicate_custom_id"


# ---------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------
def ok_record(custom_id: str, body: dict) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": f"req_{uuid.uuid4().hex}",
                         "body": body}, "error": None}


def error_record(custom_id: str, e: RequestError) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": e.status, "request_id": f"req_{uuid.uuid4().hex}",
                         "body": e.body}, "error": {"code": e.code, "message": e.message}}


def duplicate_error(line: int, custom_id: str, first_line: int) -> RequestError:
    return RequestError(DUPLICATE, f"line {line}: custom_id {custom_id!r} was already used on "
                        f"line {first_line}", "custom_id")


def encode_record(record: dict) -> bytes:
    text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    return (text + "\n").encode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------
# the resume scan
# ---------------------------------------------------------------------------------------------
_OURS = b'{"id":"batch_req_'
_CID = b'","custom_id":"'
_CID_END = b'","response":'
_ERROR_KEY = b',"error":'
_DUP_TAIL = b'{"code":"' + DUPLICATE.encode() + b'"'


@dataclass
class Done:
    """What an existing output (and errors file) already holds."""
    main: set[str] = field(default_factory=set)       # custom_ids with their own record
    dups: Counter = field(default_factory=Counter)    # custom_id -> duplicate-error records
    records: int = 0
    dropped: int = 0                                  # bytes of a torn last line removed

    def has(self, custom_id: str, occurrence: int) -> bool:
        """Whether the occurrence-th line (0: the first) with this custom_id has its record."""
        if occurrence == 0:
            return custom_id in self.main
        return occurrence <= self.dups[custom_id]


_CID_AT = len(_OURS) + 32          # batch_req_ + 32 hex digits


def _parse_line(line: bytes) -> tuple[str, bool] | None:
    """(custom_id, is a duplicate error) of one whole record line, or None. Our own lines
    are read without parsing the body: inside a JSON string every quote is escaped, so the
    first `","response":` ends the custom_id and the last `,"error":` is the last key."""
    if line.startswith(_CID, _CID_AT) and line.startswith(_OURS) and line.endswith(b"}\n"):
        start = _CID_AT + len(_CID)
        end = line.find(_CID_END, start)
        err = line.rfind(_ERROR_KEY)
        if start <= end < err:
            raw = line[start:end]
            try:
                cid = json.loads(b'"' + raw + b'"') if b"\\" in raw else raw.decode("utf-8")
            except (json.JSONDecodeError, UnicodeDecodeError):
                cid = None
            if isinstance(cid, str):
                return cid, line.startswith(_DUP_TAIL, err + len(_ERROR_KEY))
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str):
        return None
    err = obj.get("error")
    return obj["custom_id"], isinstance(err, dict) and err.get("code") == DUPLICATE


def scan_records(path: str, done: Done | None = None, repair: bool = True) -> Done:
    """Add the records of `path` (absent: nothing) to `done`. A torn last line (no newline,
    or not a whole record: a job killed mid-write) is cut off when `repair`. Any other line
    that is not a record is a DllamaError: the file is not a batch output."""
    done = done if done is not None else Done()
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return done
    except OSError as e:
        raise DllamaError(f"cannot read {path}: {e.strerror}") from None
    with f:
        offset, number, records = 0, 0, 0
        main, dups, parse = done.main, done.dups, _parse_line
        for line in f:
            number += 1
            parsed = parse(line) if line[-1:] == b"\n" else None
            if parsed is None:
                if line.startswith(_OURS) and not f.read(1):       # the torn last line
                    if repair:
                        _truncate(path, offset)
                    done.dropped = len(line)
                    break
                raise DllamaError(f"{path} line {number} is not a batch output record: this "
                                  "file is not the output of `batch` (move it away, or choose "
                                  "another --output)")
            cid, dup = parsed
            if dup:
                dups[cid] += 1
            else:
                main.add(cid)
            offset += len(line)
            records += 1
        done.records += records
    return done


def _truncate(path: str, size: int) -> None:
    try:
        with open(path, "r+b") as f:
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise DllamaError(f"cannot repair {path}: {e.strerror}") from None


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def check_writable(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise DllamaError(f"cannot write {path}: {folder} is not a writable folder")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise DllamaError(f"cannot write {path}: permission denied")


class RecordWriter:
    """Appends whole lines to a file (one write() each: a kill leaves at most a torn last line
    behind, never a torn middle), fsync at least every `fsync_seconds` and at close(). Holds
    an exclusive lock on the file from the start (taken before the resume scan): a second
    batch on the same output is an error, not a second writer. A file this writer created
    and never wrote is removed at close()."""

    def __init__(self, path: str, fsync_seconds: float = 2.0):
        self.path, self.fsync_seconds = path, fsync_seconds
        self.created = not os.path.exists(path)
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as e:
            raise DllamaError(f"cannot write {path}: {e.strerror}") from None
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise DllamaError(f"{path} is being written by another batch (it holds the file's "
                              "lock): one output, one batch at a time") from None
        self.dirty = False
        self.last_sync = time.monotonic()
        self.records = 0

    def write(self, record: dict) -> None:
        data = memoryview(encode_record(record))
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as e:
            raise DllamaError(f"cannot write {self.path}: {e.strerror}") from None
        self.records += 1
        self.dirty = True
        self.tick()

    def tick(self) -> None:
        if self.dirty and time.monotonic() - self.last_sync >= self.fsync_seconds:
            self.sync()

    def sync(self) -> None:
        if self.dirty:
            os.fsync(self.fd)
            self.dirty = False
        self.last_sync = time.monotonic()

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self.sync()
                if self.created and self.records == 0 and os.fstat(self.fd).st_size == 0:
                    os.unlink(self.path)
            finally:
                os.close(self.fd)
                self.fd = -1


def reorder(path: str, keys: Iterable[tuple[str, int]]) -> None:
    """Rewrite `path` with its records in the order of `keys` ((custom_id, occurrence) in
    input order); records no key names stay at the end. Atomic: a temporary file beside it,
    fsync, rename."""
    where: dict[tuple[str, int], tuple[int, int]] = {}
    seen: Counter = Counter()
    rest = []
    with open(path, "rb") as f:
        offset = 0
        for line in f:
            parsed = _parse_line(line)
            if parsed is None:
                raise DllamaError(f"{path}: not a batch output record at byte {offset}")
            cid, dup = parsed
            key = (cid, 1 + seen[cid] if dup else 0)
            if dup:
                seen[cid] += 1
            if key in where:
                rest.append((offset, len(line)))
            else:
                where[key] = (offset, len(line))
            offset += len(line)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".dllama-batch-", dir=folder)
    try:
        with open(path, "rb") as src, os.fdopen(fd, "wb") as out:
            def copy(span):
                src.seek(span[0])
                out.write(src.read(span[1]))
            for key in keys:
                span = where.pop(key, None)
                if span is not None:
                    copy(span)
            for span in sorted(list(where.values()) + rest):
                copy(span)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
