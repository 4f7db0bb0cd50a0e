"""Chat templates: Jinja rendered the way transformers does (sandboxed, trim/lstrip blocks,
``raise_exception``, ``strftime_now``, ``{% generation %}``); any error becomes ``ValueError``."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=16)
def compile_chat_template(template: str):
    """Compile a chat template the way transformers does (sandboxed, trim/lstrip blocks)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):
        """Accept transformers' ``{% generation %}...{% endgeneration %}`` and render the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"invalid chat template: {e}") from e



def render_chat_template(template: str, messages, add_generation_prompt: bool,
                         special_tokens: dict[str, str | None], **kwargs: Any) -> str:
    """``messages`` rendered with ``template``; the special token texts (bos_token, eos_token, ...)
    that are known are in scope, and ``kwargs`` on top of them."""
    import jinja2

    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("messages must be a list of dicts like {'role': 'user', 'content': '...'}")
    compiled = compile_chat_template(template)
    context = {k: v for k, v in special_tokens.items() if v is not None}
    context.update(kwargs)
    context.setdefault("tools", None)
    context.setdefault("documents", None)
    try:
        return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **context)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template error: {e}") from e
