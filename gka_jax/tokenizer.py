"""Tokenizer and chat template with Hugging Face semantics, without transformers.

``Tokenizer.from_folder`` reads ``tokenizer.json`` with the ``tokenizers`` library and the chat template from
``chat_template.jinja`` or ``tokenizer_config.json`` (a string, or a list of named templates). Templates
render in a sandboxed jinja2 environment set up as transformers does (trim_blocks, lstrip_blocks, loop
controls, ``tojson`` without ASCII escaping, ``raise_exception``, ``strftime_now``), so the prompt string
is identical to ``apply_chat_template(..., tokenize=False)``.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Sequence

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class TemplateError(ValueError):
    """The chat template raised, or there is none."""


def _environment():
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(f"chat template: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols],
                                        undefined=jinja2.Undefined)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


class Tokenizer:
    def __init__(self, tokenizer, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None):
        self._tok = tokenizer                      # a tokenizers.Tokenizer
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._compiled = None

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = os.fspath(path)
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        config = {}
        config_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(config_file):
            with open(config_file) as f:
                config = json.load(f)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file) as f:
                template = f.read()

        def token_text(value):
            return value.get("content") if isinstance(value, dict) else value

        return cls(HFTokenizer.from_file(file), template, token_text(config.get("bos_token")),
                   token_text(config.get("eos_token")))

    # ------------------------------------------------------------------ tokens
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, tokenize: bool = False, **kwargs):
        """Render ``messages`` (and ``tools``) with the chat template; extra kwargs (e.g. ``enable_thinking``)
        are template variables, as in transformers. Returns the string, or token ids with ``tokenize``."""
        if self.chat_template is None:
            raise TemplateError("this tokenizer has no chat template")
        if self._compiled is None:
            self._compiled = _environment().from_string(self.chat_template)
        variables = dict(kwargs)
        variables.setdefault("bos_token", self.bos_token)
        variables.setdefault("eos_token", self.eos_token)
        text = self._compiled.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                     **variables)
        return self.encode(text) if tokenize else text


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a Qwen3-style completion: the reasoning is what precedes ``</think>`` (the
    prompt already opened ``<think>``; a leading ``<think>`` is dropped too). Without ``</think>`` the whole
    text is reasoning still in progress when it started with ``<think>``, else it is all answer."""
    if THINK_CLOSE in text:
        reasoning, _, answer = text.partition(THINK_CLOSE)
        reasoning = reasoning.split(THINK_OPEN, 1)[-1] if THINK_OPEN in reasoning else reasoning
        return reasoning.strip("\n"), answer.lstrip("\n")
    if text.lstrip().startswith(THINK_OPEN):
        return text.lstrip()[len(THINK_OPEN):].strip("\n"), ""
    return None, text
