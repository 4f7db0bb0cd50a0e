"""Structured output: a request's `response_format` as a grammar that masks the logits.

The grammar library is llguidance (Microsoft's Earley parser + lexer over the token trie: a
mask costs tens of microseconds per token). Everything here runs on the root, in the
scheduler's process:

  * `response_format_text(obj)`: an OpenAI response_format object -> the frozen form that
    SamplingParams carries (JSON text, hashable), or None for plain text;
  * `GrammarCompiler(tokenizer)`: one per scheduler; `matcher(text)` compiles a frozen
    response_format for one sequence (DllamaError for an invalid one: a 400 at submit).
    llguidance's view of the tokenizer (an `LLTokenizer` built from our Hugging Face
    `tokenizers.Tokenizer`, ~0.7 s for a 49k vocabulary) is built lazily, on the first
    constrained request, and once per process for a given vocabulary;
  * `Matcher`: per sequence, `allowed()` is the boolean mask of the next token (the end ids
    only when the grammar accepts), `accept(token)` advances it, `done` is true once the
    grammar accepts and allows nothing more (the sequence then ends with "stop").

Formats: {"type": "json_object"} -> any JSON object; {"type": "json_schema", "json_schema":
{"name", "schema", "strict"}} -> that schema (strict: keywords llguidance cannot enforce are
an error; otherwise they are ignored). Whitespace between JSON tokens is bounded (at most
WHITESPACE_MAX characters per gap) so that a small model cannot loop on newlines until
max_tokens; a schema with its own top-level "x-guidance" options (llguidance's
whitespace_flexible, whitespace_pattern, item_separator, key_separator) gets those instead.
"""
from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

import numpy as np

from .errors import DllamaError

__all__ = ["response_format_text", "schema_of", "GrammarCompiler", "Matcher", "WHITESPACE_MAX"]

WHITESPACE_MAX = 24         # whitespace characters allowed between two JSON tokens
_JSON_DEFAULTS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0," + str(WHITESPACE_MAX) + "}"}

_ANY_OBJECT = {"type": "object"}


def response_format_text(obj: Any) -> str | None:
    """The frozen form of an OpenAI `response_format` (a dict, or a pydantic model dumped to
    one): None for None / {"type": "text"}; otherwise the JSON text of {"type":
    "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
    (the schema's keys in their given order: properties are generated in that order).
    Raises DllamaError for a malformed object (the schema itself is checked when compiled)."""
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise DllamaError("response_format must be an object")
    kind = obj.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json.dumps({"type": "json_object"})
    if kind != "json_schema":
        raise DllamaError(f"response_format type must be 'text', 'json_object' or 'json_schema', "
                          f"got {kind!r}")
    spec = obj.get("json_schema")
    if not isinstance(spec, dict):
        raise DllamaError("response_format json_schema needs a 'json_schema' object")
    schema = spec.get("schema")
    if not isinstance(schema, (dict, bool)):
        raise DllamaError("response_format json_schema.schema must be a JSON schema (an object)")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise DllamaError("response_format json_schema.strict must be a boolean")
    frozen = {"name": str(spec.get("name") or "schema"), "schema": schema,
              "strict": bool(strict)}
    # keys keep their order: llguidance generates properties in the schema's order
    return json.dumps({"type": "json_schema", "json_schema": frozen}, ensure_ascii=False,
                      separators=(",", ":"))


def schema_of(text: str) -> tuple[Any, bool]:
    """(JSON schema, strict) of a frozen response_format."""
    try:
        obj = json.loads(text)
    except (TypeError, ValueError) as e:
        raise DllamaError(f"response_format is not valid JSON text: {e}") from None
    if not isinstance(obj, dict):
        raise DllamaError("response_format must be a JSON object")
    if obj.get("type") == "json_object":
        return _ANY_OBJECT, True
    refrozen = response_format_text(obj)       # the same checks as the front end's
    if refrozen is None:
        raise DllamaError("response_format 'text' needs no grammar")
    spec = json.loads(refrozen)["json_schema"]
    return spec["schema"], spec["strict"]


# ---------------------------------------------------------------------------------------------
# llguidance's tokenizer: once per process and vocabulary
# ---------------------------------------------------------------------------------------------
_LL_TOKENIZERS: dict[tuple, Any] = {}
_LL_LOCK = threading.Lock()


def _ll_tokenizer(tokenizer, n_vocab: int, eos_ids: tuple[int, ...]):
    hf = getattr(tokenizer, "hf_tokenizer", None)
    if hf is None or not hasattr(hf, "to_str"):
        raise DllamaError("response_format needs a Hugging Face `tokenizers` tokenizer; "
                          f"{type(tokenizer).__name__} has none")
    spec = hf.to_str()
    key = (hashlib.sha256(spec.encode()).hexdigest(), n_vocab, eos_ids)
    with _LL_LOCK:
        ll = _LL_TOKENIZERS.get(key)
        if ll is None:
            import llguidance
            try:
                ll = llguidance.LLTokenizer(spec, n_vocab=n_vocab,
                                            eos_token=list(eos_ids) or None)
            except Exception as e:          # a tokenizer llguidance cannot read
                raise DllamaError(f"response_format: llguidance cannot use this tokenizer: "
                                  f"{e}") from None
            if len(_LL_TOKENIZERS) >= 4:    # tests start many sessions; a server has one
                _LL_TOKENIZERS.pop(next(iter(_LL_TOKENIZERS)))
            _LL_TOKENIZERS[key] = ll
    return ll


class GrammarCompiler:
    """Compiles frozen response_formats into per-sequence Matchers for one tokenizer.
    Thread-safe (submit runs on the callers' threads); cheap until the first matcher()."""

    def __init__(self, tokenizer, vocab_size: int | None = None, eos_ids=None):
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size if vocab_size is not None else tokenizer.vocab_size)
        self.eos_ids = tuple(int(i) for i in (tokenizer.eos_ids if eos_ids is None else eos_ids))
        self._lock = threading.Lock()
        self._ll = None
        self._grammars: dict[str, str] = {}     # frozen response_format -> checked grammar

    def ll_tokenizer(self):
        """llguidance's LLTokenizer of this vocabulary (built on first use)."""
        if self._ll is None:
            with self._lock:
                if self._ll is None:
                    self._ll = _ll_tokenizer(self.tokenizer, self.vocab_size, self.eos_ids)
        return self._ll

    def grammar(self, response_format: str) -> str:
        """The llguidance grammar of a frozen response_format, validated against the
        vocabulary; DllamaError naming the problem of an invalid schema."""
        with self._lock:
            g = self._grammars.get(response_format)
        if g is not None:
            return g
        import llguidance
        schema, strict = schema_of(response_format)
        overrides = None if strict else {"lenient": True}
        # a schema's own "x-guidance" options (whitespace, separators) replace our bound
        own = isinstance(schema, dict) and "x-guidance" in schema
        try:
            g = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults=None if own else _JSON_DEFAULTS,
                overrides=overrides)
        except (ValueError, TypeError) as e:
            raise DllamaError(f"response_format: invalid JSON schema: {e}") from None
        problem = llguidance.LLMatcher.validate_grammar(g, self.ll_tokenizer())
        if problem:
            raise DllamaError(f"response_format: invalid JSON schema: {problem}")
        with self._lock:
            if len(self._grammars) >= 256:
                self._grammars.pop(next(iter(self._grammars)))
            self._grammars[response_format] = g
        return g

    def matcher(self, response_format: str) -> "Matcher":
        """A fresh Matcher for one sequence (DllamaError: invalid response_format)."""
        import llguidance
        m = llguidance.LLMatcher(self.ll_tokenizer(), self.grammar(response_format),
                                 log_level=0)
        if m.is_error():
            raise DllamaError(f"response_format: invalid JSON schema: {m.get_error()}")
        return Matcher(m, self.vocab_size, self.eos_ids)


class Matcher:
    """One sequence's position in its grammar."""

    def __init__(self, ll_matcher, vocab_size: int, eos_ids: tuple[int, ...]):
        self._m = ll_matcher
        self.vocab_size = vocab_size
        self._eos = np.asarray([i for i in eos_ids if 0 <= i < vocab_size], np.int64)

    def allowed(self, n: int | None = None) -> np.ndarray:
        """Boolean mask over `n` token ids (default: the vocabulary) of the tokens the grammar
        allows next; the end ids exactly when it accepts (ids past the vocabulary: never)."""
        n = self.vocab_size if n is None else n
        bits = np.frombuffer(self._m.compute_bitmask(), np.uint8)
        mask = np.unpackbits(bits, count=min(n, bits.size * 8), bitorder="little").view(bool)
        if mask.size < n:
            mask = np.concatenate([mask, np.zeros(n - mask.size, bool)])
        eos = self._eos[self._eos < n]
        mask[eos] = self._m.is_accepting()
        return mask

    def accept(self, token: int) -> bool:
        """Advance by the sampled token; False (and `error` set) if the grammar rejects it.
        An end id is accepted when the grammar accepts (nothing is consumed)."""
        if token in self._eos:
            return self._m.is_accepting()
        return bool(self._m.consume_token(int(token)))

    @property
    def done(self) -> bool:
        """The grammar accepts and allows no further token: the output is complete."""
        return self._m.is_stopped() and self._m.is_accepting() and not self._m.is_error()

    @property
    def accepting(self) -> bool:
        return self._m.is_accepting()

    @property
    def error(self) -> str:
        return self._m.get_error()
