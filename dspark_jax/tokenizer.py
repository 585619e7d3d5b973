"""Tokenizer of a checkpoint directory: `tokenizer.json` (HF `tokenizers`) plus its chat template.

The chat template (Jinja, from `tokenizer_config.json` or `chat_template.jinja`) is rendered in a sandboxed
Jinja environment, the way HF renders it, so prompts match what the model was trained on.

Special tokens follow transformers: raw text is encoded as `tokenizer(text)` encodes it, with what the
post-processor of `tokenizer.json` adds (Gemma's `<bos>`; nothing for Qwen3). Like transformers, which drops
`add_bos_token` / `add_eos_token` from `tokenizer_config.json` when a `tokenizer.json` exists, the post-processor
alone decides. Text rendered by a chat template already holds its special tokens and is encoded without any
(`add_special_tokens=False`, as `apply_chat_template(..., tokenize=True)` does), so it never gets a second
`<bos>`.
"""

from __future__ import annotations

import json
from pathlib import Path

from dspark_jax.errors import ConfigError, InputError


class Tokenizer:
    def __init__(self, tokenizer, chat_template: str | None, special: dict[str, str | None]):
        self._tok = tokenizer
        self.chat_template = chat_template
        self.special = special

    @classmethod
    def from_directory(cls, directory) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        if directory is None:
            raise ConfigError("this model was not loaded from a directory, so it has no tokenizer")
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.exists():
            raise ConfigError(f"{directory} has no tokenizer.json; pass token ids instead of text")
        tok = HFTokenizer.from_file(str(path))
        config = {}
        if (directory / "tokenizer_config.json").exists():
            config = json.loads((directory / "tokenizer_config.json").read_text())
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (directory / "chat_template.jinja").exists():
            template = (directory / "chat_template.jinja").read_text()

        def token_text(value):
            return value.get("content") if isinstance(value, dict) else value

        special = {name: token_text(config.get(name)) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return cls(tok, template, special)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. `add_special_tokens=True` for raw text: the ids of transformers'
        `tokenizer(text)`; False (default) for text rendered by the chat template, which wrote its own."""
        check_text(text, "text")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render `messages` ([{"role", "content"}...]) with the checkpoint's chat template."""
        if not self.chat_template:
            raise ConfigError("this tokenizer has no chat template; pass raw text (drop --chat) instead")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InputError(f"message {i} must be an object with 'role' and 'content', got {m!r}")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise InputError(f"chat template rejected the conversation: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special, **kwargs
        )


def check_text(text, what: str) -> str:
    """`text` if it is a `str` that UTF-8 can encode; otherwise an `InputError` naming `what`."""
    if not isinstance(text, str):
        raise InputError(f"{what} must be text (str), got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(
            f"{what} is not valid Unicode: {e.reason} {text[e.start:e.end]!r} at character {e.start} (a lone "
            "surrogate, e.g. from a JSON \\ud800 escape or bytes decoded with errors='surrogateescape'); fix or drop it"
        ) from None
    return text

