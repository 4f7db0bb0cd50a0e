"""The Tokenizer: text <-> token ids for one model, its chat template, streaming decoders.

It wraps a Hugging Face ``tokenizers.Tokenizer`` built by one of the vocabulary readers:
GGUF metadata (gguf_vocab.py), a ``tokenizer.json`` (hf_json.py) or a Distributed Llama ``.t``
file (dllama_t.py); each gives the constructor's arguments.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable, Sequence

from tokenizers import Tokenizer as HFTokenizer

from .chat_template import render_chat_template
from .dllama_t import dllama_t_tokenizer_args
from .gguf_vocab import gguf_metadata, gguf_tokenizer_args
from .hf_json import hf_tokenizer_args
from .stream import IncrementalDecoder


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template.

    Attributes:
        vocab_size: number of token ids the model knows (rows of its embedding table).
        bos_id: beginning-of-sequence id, or None.
        eos_ids: ids that end generation: the EOS token first, then end-of-turn tokens.
        add_bos: whether ``encode`` prepends ``bos_id`` by default.
        chat_template: the Jinja chat template, or None.
    """

    def __init__(
        self,
        hf: HFTokenizer,
        *,
        vocab_size: int | None = None,
        bos_id: int | None = None,
        eos_ids: Sequence[int] = (),
        add_bos: bool = False,
        chat_template: str | None = None,
        special_tokens: dict[str, str | None] | None = None,
    ):
        self._hf = hf
        self._hf_raw: HFTokenizer | None = None  # copy that leaves special tokens unparsed
        self._lock = threading.Lock()
        self.vocab_size = int(vocab_size if vocab_size is not None else hf.get_vocab_size(with_added_tokens=True))
        self.bos_id = None if bos_id is None else int(bos_id)
        self.eos_ids = list(dict.fromkeys(int(i) for i in eos_ids))
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self.chat_template = chat_template or None
        tokens = dict(special_tokens or {})
        if tokens.get("bos_token") is None and self.bos_id is not None:
            tokens["bos_token"] = self.id_to_token(self.bos_id)
        if tokens.get("eos_token") is None and self.eos_ids:
            tokens["eos_token"] = self.id_to_token(self.eos_ids[0])
        self.special_tokens = tokens

    # ------------------------------------------------------------------ basic operations
    @property
    def hf_tokenizer(self) -> HFTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._hf

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def _raw(self) -> HFTokenizer:
        if self._hf_raw is None:
            with self._lock:
                if self._hf_raw is None:
                    raw = HFTokenizer.from_str(self._hf.to_str())
                    raw.encode_special_tokens = True
                    self._hf_raw = raw
        return self._hf_raw

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``.

        Special tokens written in the text (``<|im_start|>``) map to their ids when ``parse_special``
        is true; otherwise they are tokenized as plain text.  User-defined tokens always match.
        ``add_bos`` defaults to the model's ``add_bos`` flag.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        hf = self._hf if parse_special else self._raw()
        ids = hf.encode(text, add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``.  Special tokens are written out unless ``skip_special_tokens``."""
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry (as spelled in the vocabulary) of ``token_id``."""
        return self._hf.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def decoder(self, skip_special_tokens: bool = False) -> "IncrementalDecoder":
        """A fresh streaming decoder (one per generated sequence)."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_ids={self.eos_ids}, "
            f"add_bos={self.add_bos}, chat_template={'yes' if self.chat_template else 'no'})"
        )

    # ------------------------------------------------------------------ chat template
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}, ...]) with the model's chat template.

        Rendering follows transformers: sandboxed Jinja with ``trim_blocks``/``lstrip_blocks``,
        ``raise_exception``, ``strftime_now``, ``bos_token``/``eos_token`` (and ``unk_token``/
        ``pad_token`` when known) in scope; extra keyword arguments are passed to the template.
        Any template error (including ``raise_exception`` calls) is raised as ``ValueError``.
        """
        if not self.chat_template:
            raise ValueError("this model has no chat template (tokenizer.chat_template is missing)")
        return render_chat_template(self.chat_template, messages, add_generation_prompt,
                                    self.special_tokens, **kwargs)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def _from_args(cls, args: dict[str, Any]) -> "Tokenizer":
        """A Tokenizer from a vocabulary reader's arguments (``hf`` and the keyword arguments,
        plus ``scores`` for files that keep them)."""
        scores = args.pop("scores", None)
        tok = cls(args.pop("hf"), **args)
        if scores is not None:
            tok.scores = scores
        return tok

    @classmethod
    def from_gguf(cls, source) -> "Tokenizer":
        """Build the tokenizer described by a GGUF file's ``tokenizer.ggml.*`` metadata.

        ``source``: a file path, a header formats/gguf_header.py parsed (``GGUFModel.header``:
        its fields are used, the file is not parsed again) or an open ``gguf.GGUFReader``.  Raises
        ``ValueError`` when the file has no tokenizer or one of an unsupported kind.
        """
        return cls._from_args(gguf_tokenizer_args(gguf_metadata(source)))

    @classmethod
    def from_hf_files(cls, tokenizer_json_path, tokenizer_config_path=None) -> "Tokenizer":
        """Load a Hugging Face ``tokenizer.json`` (+ optional ``tokenizer_config.json``).

        The config gives ``chat_template``, ``bos_token``/``eos_token`` and ``add_bos_token``; a
        ``chat_template.jinja`` and a ``generation_config.json`` next to ``tokenizer.json`` are used
        when present (template, extra EOS ids).
        """
        return cls._from_args(hf_tokenizer_args(tokenizer_json_path, tokenizer_config_path))

    @classmethod
    def from_dllama_t(cls, path, pre: str | None = None) -> "Tokenizer":
        """Load a Distributed Llama ``.t`` tokenizer file (raw token bytes + scores; see dllama_t.py).

        ``pre`` overrides the pre-tokenizer guessed from the special tokens (see
        ``PRE_TOKENIZER_TYPES``).  ``scores`` keeps the file's scores.  Raises ``DllamaError`` on
        a malformed file.
        """
        return cls._from_args(dllama_t_tokenizer_args(path, pre))
