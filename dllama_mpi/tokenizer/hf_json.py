"""A Hugging Face ``tokenizer.json`` (+ ``tokenizer_config.json``): the arguments of a Tokenizer.

The config gives ``chat_template``, ``bos_token``/``eos_token`` and ``add_bos_token``; a
``chat_template.jinja`` and a ``generation_config.json`` next to ``tokenizer.json`` are used when
present (template, extra EOS ids).
"""

from __future__ import annotations

import json
import os
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from .bpe import END_OF_TURN_TOKENS


def _content(v):
    if isinstance(v, dict):
        return v.get("content")
    return v


def hf_tokenizer_args(tokenizer_json_path, tokenizer_config_path=None) -> dict[str, Any]:
    """The Tokenizer arguments of a ``tokenizer.json`` and its config (found next to it when
    ``tokenizer_config_path`` is None)."""
    tokenizer_json_path = os.fspath(tokenizer_json_path)
    folder = os.path.dirname(os.path.abspath(tokenizer_json_path))
    hf = HFTokenizer.from_file(tokenizer_json_path)
    config: dict = {}
    if tokenizer_config_path is None:
        candidate = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(candidate):
            tokenizer_config_path = candidate
    if tokenizer_config_path is not None:
        with open(tokenizer_config_path, encoding="utf-8") as f:
            config = json.load(f)

    bos_token = _content(config.get("bos_token"))
    eos_token = _content(config.get("eos_token"))
    bos_id = hf.token_to_id(bos_token) if bos_token else None
    eos_id = hf.token_to_id(eos_token) if eos_token else None

    # Does the tokenizer.json's post-processor add BOS by itself?  (Llama 3 style files)
    probe_with = hf.encode("a", add_special_tokens=True).ids
    probe_without = hf.encode("a", add_special_tokens=False).ids
    post_adds_bos = len(probe_with) > len(probe_without) and probe_with[0] != probe_without[0]
    if bos_id is None and post_adds_bos:
        bos_id = probe_with[0]
    add_bos = config.get("add_bos_token")
    if add_bos is None:
        add_bos = post_adds_bos

    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if not template:
        jinja_path = os.path.join(folder, "chat_template.jinja")
        if os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()

    eos_ids = [eos_id] if eos_id is not None else []
    gen_path = os.path.join(folder, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path, encoding="utf-8") as f:
            gen = json.load(f)
        extra = gen.get("eos_token_id")
        eos_ids += extra if isinstance(extra, list) else ([extra] if extra is not None else [])
    specials = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
    for t in END_OF_TURN_TOKENS:
        if t in specials:
            eos_ids.append(hf.token_to_id(t))
    special = {
        "bos_token": bos_token,
        "eos_token": eos_token,
        "unk_token": _content(config.get("unk_token")),
        "pad_token": _content(config.get("pad_token")),
    }
    return dict(hf=hf, vocab_size=hf.get_vocab_size(with_added_tokens=True), bos_id=bos_id,
                eos_ids=[i for i in eos_ids if i is not None], add_bos=bool(add_bos),
                chat_template=template, special_tokens=special)
