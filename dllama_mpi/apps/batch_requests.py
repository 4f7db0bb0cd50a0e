"""One batch request as the server would take it, and the body the server would answer.

`prepare` does what the server does to a POST body before it reaches the scheduler (the
OpenAI request models of openai_schema, to_sampling_params, the chat template, the prompt
checks, the cap of max_tokens at the room a prompt leaves); `answer` builds the response body
from the scheduler's Completions with openai_schema's builders, as the server's non-streaming
reply does. A request the server would refuse raises RequestError carrying the server's own
error body (status 400); the batch writes it as that request's error record.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from ..config import SamplingParams
from ..errors import DllamaError
from . import openai_schema as oa

__all__ = ["CHAT_URL", "COMPLETIONS_URL", "URLS", "RequestError", "Prepared", "prepare",
           "answer", "MAX_SEQUENCES"]

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
URLS = (CHAT_URL, COMPLETIONS_URL)
MAX_SEQUENCES = 64          # sequences one request may start (prompts x n), as the server


class RequestError(Exception):
    """A request refused before generation: an error record with `status` and the body the
    server would answer (`body`), and the batch-level `code` and `message`."""

    def __init__(self, code: str, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", body_code: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param, self.status = code, message, param, status
        self.body = oa.error_body(message, type, param, body_code)


@dataclass
class Prepared:
    chat: bool
    params: SamplingParams
    prompts: list[list[int]]       # token ids of each prompt
    n: int                         # sequences per prompt
    per_prompt: list[SamplingParams]   # params with max_tokens capped at the prompt's room

    def sequences(self) -> list[tuple[list[int], SamplingParams]]:
        """(prompt, params) of each sequence in submit order: prompt-major, then n."""
        return [(q, p) for q, p in zip(self.prompts, self.per_prompt) for _ in range(self.n)]


def _invalid(message: str, param: str | None = None, body_code: str | None = None,
             code: str = "invalid_body") -> RequestError:
    return RequestError(code, message, param, body_code=body_code)


def prepare(url: str, obj, tokenizer, max_seq_len: int, defaults: SamplingParams) -> Prepared:
    """The request `obj` (a decoded JSON body) for `url`, checked as the server checks it;
    RequestError when the server would answer 400."""
    chat = url == CHAT_URL
    if not isinstance(obj, dict):
        raise _invalid("the request body must be a JSON object")
    model = oa.ChatCompletionRequest if chat else oa.CompletionRequest
    try:
        body = model.model_validate(obj)
    except oa.ValidationError as e:
        message, param = oa.validation_error_message(e.errors())
        raise _invalid(message, param) from None
    if body.stream:
        raise _invalid("stream is not supported in a batch (each line gets one whole answer)",
                       "stream")
    try:
        params = oa.to_sampling_params(body, defaults)
    except DllamaError as e:
        raise _invalid(str(e)) from None
    if chat:
        try:
            text = tokenizer.apply_chat_template(body.template_messages(),
                                                 add_generation_prompt=True)
        except ValueError as e:
            raise _invalid(str(e), "messages") from None
        prompts = [_check_prompt(_encode(tokenizer, text, "messages"), "messages", max_seq_len)]
    else:
        vocab = getattr(tokenizer, "vocab_size", None)
        prompts = [_check_prompt(_encode(tokenizer, p, "prompt") if isinstance(p, str) else
                                 _check_ids(p, vocab), "prompt", max_seq_len)
                   for p in body.prompts()]
    if len(prompts) * body.n > MAX_SEQUENCES:
        raise _invalid(f"at most {MAX_SEQUENCES} sequences per request (prompts x n), got "
                       f"{len(prompts) * body.n}", "n")
    overflow = oa.completion_overflow(body, prompts, max_seq_len)
    if overflow is not None:
        raise RequestError("context_length_exceeded", overflow, "max_tokens",
                           body_code="context_length_exceeded")
    per_prompt = [replace(params, max_tokens=min(params.max_tokens, max_seq_len - len(p)))
                  for p in prompts]
    return Prepared(chat, params, prompts, body.n, per_prompt)


def _encode(tokenizer, text: str, param: str) -> list[int]:
    message = oa.nul_message(text, param)
    if message is not None:
        raise _invalid(message, param)
    return tokenizer.encode(text)


def _check_prompt(ids: list[int], param: str, max_seq_len: int) -> list[int]:
    if not ids:
        raise _invalid("the prompt is empty", param)
    if len(ids) >= max_seq_len:
        raise RequestError(
            "context_length_exceeded",
            f"This model's maximum context length is {max_seq_len} tokens, but the prompt has "
            f"{len(ids)} tokens (at least one must be left to generate). Please shorten the "
            f"{param}.", param, body_code="context_length_exceeded")
    return ids


def _check_ids(ids: list[int], vocab_size: int | None) -> list[int]:
    if vocab_size and any(t >= vocab_size for t in ids):
        raise _invalid(f"prompt token ids must be below the vocabulary size {vocab_size}",
                       "prompt")
    return ids


def _finish(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


def token_texts(tokenizer):
    """token id -> its text, cached (the logprobs' "token" strings), as the server has it."""
    return functools.lru_cache(maxsize=65536)(lambda t: tokenizer.decode([t]))


def answer(prepared: Prepared, completions: list, events: list[list] | None, rid: str,
           created: int, model_name: str, token_text) -> dict:
    """The server's non-streaming response body for these Completions (in submit order);
    `events`: each sequence's TokenEvents when logprobs were asked. RequestError (500) when a
    sequence failed."""
    for c in completions:
        if c.finish_reason == "error":
            raise RequestError("generation_failed",
                               f"generation failed: {c.error or 'unknown error'}",
                               status=500, type="server_error")
    chat, p = prepared.chat, prepared.params
    choices = []
    for i, c in enumerate(completions):
        lp = None
        if p.logprobs:
            kept = [(e.token, e.logprob, e.top_logprobs)
                    for e in events[i]][:len(c.generated_tokens)]
            lp = (oa.chat_logprobs(kept, token_text) if chat else
                  oa.completion_logprobs(kept, token_text, with_top=p.top_logprobs > 0))
        finish = _finish(c.finish_reason)
        choices.append(oa.chat_choice(i, c.text, finish, lp) if chat else
                       oa.completion_choice(i, c.text, finish, lp))
    n = prepared.n
    cached = sum(min(c.cached_tokens or 0 for c in completions[i * n:(i + 1) * n])
                 for i in range(len(prepared.prompts)))
    u = oa.usage(sum(len(q) for q in prepared.prompts),
                 sum(len(c.generated_tokens) for c in completions), cached)
    if chat:
        return oa.chat_response(rid, created, model_name, choices, u)
    return oa.completion_response(rid, created, model_name, choices, u)
