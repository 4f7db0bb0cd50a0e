"""The input of `batch`, read lazily (never the whole file in memory) in one of three formats.

Input formats (`detect_format` looks at the first non-blank line):
  openai  {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
          "body": {...}}                                  (the OpenAI Batch API input)
  jsonl   {"prompt": "..."} or {"messages": [...]}, optional "id" and "max_tokens"
  text    one prompt per line
A line that cannot be a request becomes an Item with an `error` (its error record); the
custom_id of a line without one is "line-N" (N: its 1-based line number in the file).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator

from ..errors import DllamaError
from .batch_requests import CHAT_URL, COMPLETIONS_URL, URLS, RequestError

FORMATS = ("openai", "jsonl", "text")
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
