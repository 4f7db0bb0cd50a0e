"""The OpenAI API as this package speaks it: request bodies (pydantic), their translation to
SamplingParams, and the JSON of responses and streaming chunks.

Only pydantic is imported here (no FastAPI, no engine), so the batch command can check its
lines against the same models.

Requests (/v1/chat/completions, /v1/completions):
  * sampling: temperature [0, 2], top_p (0, 1], top_k (extension, 0 or -1: off), seed (any
    64-bit integer, taken modulo 2**63), stop (a string or up to 4), max_tokens /
    max_completion_tokens (>= 1), n (1..MAX_N sequences), ignore_eos (extension);
  * logprobs: chat `logprobs: bool` + `top_logprobs: 0..20`, completions `logprobs: 0..20`;
  * min_p [0, 1] (extension: drop tokens below min_p x the top probability);
  * response_format: {"type": "text"}, {"type": "json_object"} (any JSON object) or
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}: the output is
    constrained to the schema by a grammar (dllama_mpi/grammar.py); an invalid schema is a
    400 when the scheduler compiles it;
  * accepted only at their neutral value: presence_penalty / frequency_penalty 0, logit_bias
    empty, no tools, completions echo false / no suffix / best_of == n; anything else is a
    400 naming the field;
  * `model` and `user` are accepted and ignored (the server answers with its one model);
    unknown fields are ignored, as the OpenAI API does for forward compatibility.
Types are strict (no "1" for 1, no 1 for true); an int is accepted where a float is expected.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any, Callable, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import SamplingParams
from ..grammar import response_format_text

__all__ = [
    "MAX_N", "MAX_STOP", "ChatMessage", "ChatCompletionRequest", "CompletionRequest",
    "StreamOptions", "ResponseFormat", "JsonSchemaFormat", "to_sampling_params", "validation_error_message",
    "error_body", "new_id", "usage", "chat_logprobs", "completion_logprobs", "chat_response",
    "completion_response", "chat_chunk", "completion_chunk", "usage_chunk", "sse", "SSE_DONE",
    "ValidationError",
]

MAX_N = 16          # sequences per request (n); each takes a KV slot while it runs
MAX_STOP = 4        # stop strings per request (the OpenAI limit)
SEED_MODULUS = 2**63

_CONFIG = ConfigDict(strict=True, extra="ignore")


# ---------------------------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = _CONFIG
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """response_format.json_schema: OpenAI's {"name", "description", "schema", "strict"}."""
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object "
                             "({'name', 'schema', 'strict'})")
        return self

    def frozen(self) -> str | None:
        """SamplingParams.response_format: None for text, else canonical JSON text."""
        if self.type == "json_schema":
            js = self.json_schema
            return response_format_text({"type": "json_schema", "json_schema": {
                "name": js.name, "schema": js.schema_, "strict": js.strict}})
        return response_format_text({"type": self.type})


class ContentPart(BaseModel):
    model_config = _CONFIG
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text":
            raise ValueError(f"content parts of type {self.type!r} are not supported: only 'text'")
        if self.text is None:
            raise ValueError("a text content part needs 'text'")
        return self


class ChatMessage(BaseModel):
    model_config = _CONFIG
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v):
        if isinstance(v, list):
            for p in v:
                if isinstance(p, dict) and p.get("type", "text") != "text":
                    raise ValueError(f"content parts of type {p.get('type')!r} are not "
                                     "supported: only 'text'")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content)

    def to_template(self) -> dict:
        """The dict a chat template expects ("developer" is the newer name of "system")."""
        role = "system" if self.role == "developer" else self.role
        m = {"role": role, "content": self.text()}
        if self.name is not None:
            m["name"] = self.name
        return m


class _Common(BaseModel):
    """Fields both endpoints share."""
    model_config = _CONFIG
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return v
        items = [v] if isinstance(v, str) else v
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(items)}")
        if any(not s for s in items):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v, info):
        if v is not None and v != 0:
            raise ValueError(f"{info.field_name} is not supported: only 0")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    def stop_tuple(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v):
        if v:
            raise ValueError("tools are not supported")
        return v

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def template_messages(self) -> list[dict]:
        return [m.to_template() for m in self.messages]


class CompletionRequest(_Common):
    # a string, a list of strings, a list of token ids, or a list of token-id lists
    prompt: Any
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        def ids(x):
            return isinstance(x, list) and x and all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in x)
        if isinstance(v, str):
            return v
        if isinstance(v, list) and v:
            if all(isinstance(s, str) for s in v) or ids(v) or all(ids(x) for x in v):
                return v
        raise ValueError("prompt must be a string, a non-empty list of strings, a non-empty list "
                         "of token ids (integers >= 0) or a list of such lists")

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("suffix is not supported")
        return v

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (only best_of == n)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: a text or a token-id list."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


def to_sampling_params(body: _Common, defaults: SamplingParams | None = None) -> SamplingParams:
    """The request's sampling, fields it leaves out taken from `defaults`. Raises DllamaError
    (SamplingParams.check) for values pydantic let through."""
    d = defaults or SamplingParams()
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or d.max_tokens
    top_k = d.top_k if body.top_k is None else max(body.top_k, 0)
    seed = d.seed if body.seed is None else body.seed % SEED_MODULUS
    if isinstance(body, ChatCompletionRequest):
        logprobs = bool(body.logprobs)
        top_logprobs = (body.top_logprobs or 0) if logprobs else 0
    elif isinstance(body, CompletionRequest):
        logprobs = body.logprobs is not None
        top_logprobs = body.logprobs or 0
    else:
        logprobs, top_logprobs = d.logprobs, d.top_logprobs
    params = SamplingParams(
        temperature=d.temperature if body.temperature is None else float(body.temperature),
        top_p=d.top_p if body.top_p is None else float(body.top_p),
        top_k=top_k, seed=seed, max_tokens=max_tokens,
        stop=body.stop_tuple() if body.stop is not None else d.stop,
        ignore_eos=body.ignore_eos or d.ignore_eos,
        logprobs=logprobs, top_logprobs=top_logprobs,
        min_p=d.min_p if body.min_p is None else float(body.min_p),
        response_format=(d.response_format if body.response_format is None
                         else body.response_format.frozen()))
    params.check()
    return params


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def _loc_param(loc: Iterable) -> str | None:
    """A pydantic error location as an OpenAI `param` ("messages.[0].content"), the union
    branch tags pydantic inserts ("str", "list[int]", "function-after[...]") left out."""
    parts = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif isinstance(p, str) and not ("[" in p or "(" in p or p in (
                "str", "int", "float", "bool", "none", "list", "dict") or p[:1].isupper()):
            parts.append(p)
    return ".".join(parts) or None


def validation_error_message(errors: list[dict], skip_loc: int = 0) -> tuple[str, str | None]:
    """(message, param) of the first error of a pydantic / FastAPI validation error list."""
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = tuple(e.get("loc", ()))[skip_loc:]
    param = _loc_param(loc)
    msg = str(e.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if e.get("type") == "missing":
        msg = "field required"
    return (f"{param}: {msg}" if param else msg), param


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------
# responses
# ---------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    """"chatcmpl-…" / "cmpl-…"."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


# a logprob entry: (token id, logprob, [(token id, logprob), ...] or None), as a TokenEvent has them
LogprobEntry = tuple[int, float | None, "list[tuple[int, float]] | None"]


def _lp(x: float | None) -> float | None:
    """A logprob JSON can carry: -inf (a token sampling ruled out) as OpenAI's -9999.0."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else -9999.0


def _tok(token_text: Callable[[int], str], t: int) -> dict:
    s = token_text(t)
    return {"token": s, "bytes": list(s.encode("utf-8"))}


def chat_logprobs(entries: list[LogprobEntry], token_text: Callable[[int], str]) -> dict:
    """{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal": None}."""
    content = []
    for t, lp, top in entries:
        item = _tok(token_text, t)
        item["logprob"] = _lp(lp)
        item["top_logprobs"] = [dict(_tok(token_text, u), logprob=_lp(ulp))
                                for u, ulp in (top or [])]
        content.append(item)
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[LogprobEntry], token_text: Callable[[int], str],
                        offset: int = 0, with_top: bool = True) -> dict:
    """The legacy shape: {"tokens", "token_logprobs", "top_logprobs", "text_offset"};
    `offset` is where the first token starts in the choice's text (streaming chunks)."""
    tokens, lps, tops, offsets = [], [], [], []
    for t, lp, top in entries:
        s = token_text(t)
        tokens.append(s)
        lps.append(_lp(lp))
        tops.append({token_text(u): _lp(ulp) for u, ulp in (top or [])})
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops if with_top else None,
            "text_offset": offsets}


def chat_choice(index: int, text: str, finish_reason: str, logprobs: dict | None = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": logprobs, "finish_reason": finish_reason}


def completion_choice(index: int, text: str, finish_reason: str,
                      logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_response(id: str, created: int, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": None, "choices": choices, "usage": usage_}


def completion_response(id: str, created: int, model: str, choices: list[dict],
                        usage_: dict) -> dict:
    return {"id": id, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": None, "choices": choices, "usage": usage_}


def _chunk(obj: str, id: str, created: int, model: str, choice: dict,
           include_usage: bool) -> dict:
    c = {"id": id, "object": obj, "created": created, "model": model,
         "system_fingerprint": None, "choices": [choice]}
    if include_usage:
        c["usage"] = None
    return c


def chat_chunk(id: str, created: int, model: str, index: int, delta: dict,
               finish_reason: str | None = None, logprobs: dict | None = None,
               include_usage: bool = False) -> dict:
    return _chunk("chat.completion.chunk", id, created, model,
                  {"index": index, "delta": delta, "logprobs": logprobs,
                   "finish_reason": finish_reason}, include_usage)


def completion_chunk(id: str, created: int, model: str, index: int, text: str,
                     finish_reason: str | None = None, logprobs: dict | None = None,
                     include_usage: bool = False) -> dict:
    return _chunk("text_completion", id, created, model,
                  {"index": index, "text": text, "logprobs": logprobs,
                   "finish_reason": finish_reason}, include_usage)


def usage_chunk(id: str, created: int, model: str, obj: str, usage_: dict) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices."""
    return {"id": id, "object": obj, "created": created, "model": model,
            "system_fingerprint": None, "choices": [], "usage": usage_}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"

# re-exported for callers that validate by hand (batch)
ValidationError = ValidationError


def completion_overflow(body, prompts: list[list[int]], max_seq_len: int) -> str | None:
    """The 400 message (context_length_exceeded, param max_tokens) when the request asks
    for more tokens than its longest prompt leaves room for, as OpenAI answers; None when it
    fits or leaves max_tokens to the room."""
    asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
    longest = max(len(p) for p in prompts)
    if asked is None or longest + asked <= max_seq_len:
        return None
    return (f"This model's maximum context length is {max_seq_len} tokens. However, you "
            f"requested {longest + asked} tokens ({longest} in the prompt, {asked} in the "
            f"completion). Please reduce the length of the prompt or of the completion.")


def nul_message(text: str, param: str) -> str | None:
    """The 400 message when a prompt text holds a NUL character (no tokenizer means it;
    binary data pasted by mistake), else None."""
    return f"the {param} contain a NUL character" if "\0" in text else None
