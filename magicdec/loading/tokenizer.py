"""Tokenizers: a fast `tokenizers` tokenizer plus the chat template and special tokens.

From a checkpoint directory it reads tokenizer.json and tokenizer_config.json. From a GGUF file it
converts the embedded vocabulary with transformers' GGUF conversion once, and keeps the result in
the file's conversion directory (see `magicdec.loading.gguf_file`) so later loads are fast.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from magicdec.loading.errors import LoadError


class Tokenizer:
    def __init__(self, backend: Any, special: dict[str, str | None], chat_template: str | None) -> None:
        self.backend = backend
        self.bos_token, self.eos_token = special.get("bos_token"), special.get("eos_token")
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens`: the tokenizer's own additions (e.g. a BOS)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of chat messages rendered by the chat template. The template writes every special
        token itself (Llama's and Mistral's their BOS), so none is added on encoding, as transformers does."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        """Render chat messages (and `tools`, OpenAI's function definitions, as transformers passes them) with
        the checkpoint's own Jinja template, in Jinja's immutable sandbox (as transformers and vLLM do): a
        template comes with the model, and a template that reaches for Python's internals (`''.__class__`, a
        function's globals) or mutates its inputs is refused, not run. `tojson` is transformers' (no HTML
        escapes), so a template renders its tools as under transformers."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; pass plain prompts instead")
        from jinja2.exceptions import SecurityError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = tojson
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                tools=tools or None,
            )
        except SecurityError as e:
            raise ValueError(f"the chat template tried an unsafe operation ({e}) and was stopped: the model's "
                             "chat template is not trustworthy; fix or replace it") from None

    @functools.cached_property
    def template_uses_tools(self) -> bool:
        """The chat template reads the `tools` variable (so it can render tool definitions)."""
        if not self.chat_template:
            return False
        from jinja2 import Environment, meta

        return "tools" in meta.find_undeclared_variables(Environment(extensions=["jinja2.ext.loopcontrols"]).parse(
            self.chat_template))

    # ---- constructors ------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: Path) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise LoadError(
                f"{path} has no tokenizer.json; magicdec reads fast tokenizers. Create one with transformers: "
                "AutoTokenizer.from_pretrained(dir).save_pretrained(dir)"
            )
        config: dict[str, Any] = {}
        if (path / "tokenizer_config.json").is_file():
            try:
                config = json.loads((path / "tokenizer_config.json").read_text())
            except ValueError as e:
                raise LoadError(f"{path / 'tokenizer_config.json'} is not valid JSON ({e})") from None
        special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token")}
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        try:
            backend = Backend.from_file(str(tok_file))
        except Exception as e:  # the tokenizers library raises a bare Exception on a bad file
            raise LoadError(f"{tok_file} is not a readable tokenizer ({e}); it is truncated or corrupt") from None
        return cls(backend, special, template)

    @classmethod
    def from_gguf(cls, path: Path, cache_dir: Path) -> Tokenizer:
        """The GGUF file's tokenizer, converted by transformers once (by one process, however many ask)
        and kept in `cache_dir`."""
        from magicdec.loading.conversion import convert_once

        convert_once(cache_dir, "tokenizer", lambda dest: _convert_gguf_tokenizer(path, dest),
                     f"the tokenizer of {path.name}")
        try:
            return cls.from_dir(cache_dir)
        except LoadError as e:
            raise LoadError(f"{e} [the conversion of {path.name}: delete {cache_dir} to convert it again]") from None


def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
           sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _token_text(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _convert_gguf_tokenizer(path: Path, dest: Path) -> None:
    """Write the GGUF file's tokenizer, converted by transformers, into the folder `dest`."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise LoadError("reading a GGUF file's tokenizer needs transformers: pip install transformers") from None
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise LoadError(f"{path}: cannot convert the GGUF tokenizer: {e}") from None
    tok.save_pretrained(str(dest))
