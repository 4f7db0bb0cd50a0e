"""The files of `batch`: the input read lazily in one of three formats, the output records in
the OpenAI Batch output shape, the resume scan of an existing output, the append-only writer,
and the final rewrite in input order.

Input formats (`detect_format` looks at the first non-blank line):
  openai  {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
          "body": {...}}                                  (the OpenAI Batch API input)
  jsonl   {"prompt": "..."} or {"messages": [...]}, optional "id" and "max_tokens"
  text    one prompt per line
A line that cannot be a request becomes an Item with an `error` (its error record); the
custom_id of a line without one is "line-N" (N: its 1-based line number in the file).

Output: one JSON line per request, written whole in one write() call:
  {"id": "batch_req_…", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}
`error` is null for a 200 answer, else {"code", "message"} (the body is then the OpenAI error
object). The keys come in that order, compact, so the resume scan reads custom_id and the
error code without parsing the body.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from ..errors import DllamaError
from .batch_requests import CHAT_URL, COMPLETIONS_URL, URLS, RequestError

FORMATS = ("openai", "jsonl", "text")
DUPLICATE = "duplicate_custom_id"
_SIMPLE_KEYS = {"id", "prompt", "messages", "max_tokens"}


@dataclass
class Item:
    """One request line of the input."""
    line: int                      # 1-based line number in the file
    index: int                     # 0-based among the file's requests (blank lines skipped)
    custom_id: str
    url: str | None = None
    body: object = None
    error: RequestError | None = None


def _bad(code: str, message: str, param: str | None = None) -> RequestError:
    return RequestError(code, message, param)


# ---------------------------------------------------------------------------------------------
# input
# ---------------------------------------------------------------------------------------------
def _open_input(path: str):
    try:
        return open(path, "rb")
    except OSError as e:
        raise DllamaError(f"cannot read {path}: {e.strerror}") from None


def detect_format(path: str) -> str:
    """openai, jsonl or text, from the first non-blank line; DllamaError for an unreadable
    or empty file."""
    with _open_input(path) as f:
        for raw in f:
            s = raw.strip()
            if not s:
                continue
            if not s.startswith(b"{"):
                return "text"
            try:
                obj = json.loads(s)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return "openai" if b'"custom_id"' in s else "jsonl"
            if isinstance(obj, dict) and ({"custom_id", "body", "url"} & set(obj)):
                return "openai"
            return "jsonl"
    raise DllamaError(f"{path} holds no requests")


def count_requests(path: str) -> int:
    """Non-blank lines (requests) of the input, read in binary without decoding."""
    n = 0
    with _open_input(path) as f:
        for raw in f:
            if not raw.isspace():
                n += 1
    return n


def read_items(path: str, fmt: str, chat: bool = False) -> Iterator[Item]:
    """The input's requests, one line at a time (never the whole file in memory)."""
    parse = {"openai": _openai_item, "jsonl": _simple_item, "text": _text_item}[fmt]
    index = 0
    with _open_input(path) as f:
        for number, raw in enumerate(f, 1):
            if raw.isspace() or not raw:
                continue
            item = Item(number, index, f"line-{number}")
            index += 1
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                item.error = _bad("invalid_encoding", f"line {number} is not UTF-8 text: "
                                  f"{e.reason} at byte {e.start}")
                yield item
                continue
            try:
                parse(item, text, chat)
            except RequestError as e:
                item.error = e
            yield item


def _json_object(item: Item, text: str) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _bad("invalid_json", f"line {item.line}: not valid JSON ({e.msg} at column "
                   f"{e.colno})") from None
    if not isinstance(obj, dict):
        raise _bad("invalid_request", f"line {item.line}: expected a JSON object, got "
                   f"{type(obj).__name__}")
    return obj


def _openai_item(item: Item, text: str, chat: bool) -> None:
    obj = _json_object(item, text)
    cid = obj.get("custom_id")
    if isinstance(cid, str) and cid:
        item.custom_id = cid
    else:
        raise _bad("invalid_request", f"line {item.line}: \"custom_id\" must be a non-empty "
                   "string", "custom_id")
    method = obj.get("method", "POST")
    if method != "POST":
        raise _bad("invalid_method", f"line {item.line}: method must be \"POST\", got "
                   f"{method!r}", "method")
    url = obj.get("url")
    if url not in URLS:
        raise _bad("invalid_url", f"line {item.line}: url must be one of {', '.join(URLS)}, "
                   f"got {url!r}", "url")
    if not isinstance(obj.get("body"), dict):
        raise _bad("invalid_request", f"line {item.line}: \"body\" must be a JSON object",
                   "body")
    item.url, item.body = url, obj["body"]


def _simple_item(item: Item, text: str, chat: bool) -> None:
    obj = _json_object(item, text)
    rid = obj.get("id")
    if isinstance(rid, str) and rid:
        item.custom_id = rid
    elif rid is not None and not isinstance(rid, str):
        item.custom_id = json.dumps(rid, ensure_ascii=False, separators=(",", ":"))
    where = f"line {item.line}"
    unknown = sorted(set(obj) - _SIMPLE_KEYS)
    if unknown:
        raise _bad("invalid_request", f"{where}: unknown keys {', '.join(unknown)}")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if (prompt is None) == (messages is None):
        raise _bad("invalid_request", f"{where}: needs exactly one of \"prompt\" or \"messages\"")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise _bad("invalid_request", f"{where}: \"prompt\" must be a non-empty string", "prompt")
    if messages is not None and not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages)):
        raise _bad("invalid_request", f"{where}: \"messages\" must be a non-empty list of "
                   "{\"role\": str, \"content\": str}", "messages")
    body = {}
    if "max_tokens" in obj:
        m = obj["max_tokens"]
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise _bad("invalid_request", f"{where}: \"max_tokens\" must be a positive integer",
                       "max_tokens")
        body["max_tokens"] = m
    if messages is not None:
        item.url, body["messages"] = CHAT_URL, messages
    elif chat:
        item.url, body["messages"] = CHAT_URL, [{"role": "user", "content": prompt}]
    else:
        item.url, body["prompt"] = COMPLETIONS_URL, prompt
    item.body = body


def _text_item(item: Item, text: str, chat: bool) -> None:
    if chat:
        item.url, item.body = CHAT_URL, {"messages": [{"role": "user", "content": text}]}
    else:
        item.url, item.body = COMPLETIONS_URL, {"prompt": text}


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


def duplicate_error(item: Item, first_line: int) -> RequestError:
    return _bad(DUPLICATE, f"line {item.line}: custom_id {item.custom_id!r} was already used "
                f"on line {first_line}", "custom_id")


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
    behind, never a torn middle), fsync at least every `fsync_seconds` and at close()."""

    def __init__(self, path: str, fsync_seconds: float = 2.0):
        self.path, self.fsync_seconds = path, fsync_seconds
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as e:
            raise DllamaError(f"cannot write {path}: {e.strerror}") from None
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
