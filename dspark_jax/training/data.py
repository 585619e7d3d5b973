"""Training samples from JSONL: chat conversations or plain text -> token ids + loss mask (docs/algorithm.md §6.1).

A record is `{"conversations": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` or
`{"text": str}`. Conversations are rendered with the checkpoint's chat template (no generation prompt),
tokenised without special-token insertion and truncated to `max_length`. The loss mask is 1 on every
assistant turn's content including its end-of-turn string: for each match of
`header([\\s\\S]*?(?:eot|$))` the character span of the group is mapped to tokens by tokenising the text
prefix up to the span's start and end, as the reference does. Plain text is supervised everywhere.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dspark_jax.errors import InputError

# Qwen-layout chat markers (the fixture tokenizer and the Qwen3 family use them).
QWEN_ASSISTANT_HEADER = "<|im_start|>assistant\n"
QWEN_END_OF_TURN = "<|im_end|>\n"


def read_jsonl(path) -> Iterator[dict]:
    """Records of a JSONL file, each checked to be a conversation or a text record."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"training data file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n} is not valid JSON: {e}") from e
            if not isinstance(record, dict) or not ("conversations" in record or "text" in record):
                raise InputError(f"{path}:{n}: expected {{'conversations': [...]}} or {{'text': ...}}, got {str(record)[:80]!r}")
            yield record


def tokenize_record(
    tokenizer,
    record: dict,
    *,
    max_length: int,
    default_system_prompt: str | None = None,
    assistant_header: str = QWEN_ASSISTANT_HEADER,
    end_of_turn: str = QWEN_END_OF_TURN,
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids int32[L], loss_mask uint8[L]) of one record, `L <= max_length`."""
    if "text" in record:
        ids = tokenizer.encode(str(record["text"]))[:max_length]
        return np.asarray(ids, np.int32), np.ones(len(ids), np.uint8)
    messages = list(record["conversations"])
    if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise InputError(f"conversation must be a non-empty list of {{'role', 'content'}} messages: {str(messages)[:80]!r}")
    if default_system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": default_system_prompt}, *messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    ids = tokenizer.encode(text)
    mask = np.zeros(len(ids), np.uint8)
    pattern = re.escape(assistant_header) + r"([\s\S]*?(?:" + re.escape(end_of_turn) + r"|$))"
    for match in re.finditer(pattern, text):
        start = len(tokenizer.encode(text[: match.start(1)]))
        end = len(tokenizer.encode(text[: match.end(1)]))
        mask[start:end] = 1
    return np.asarray(ids[:max_length], np.int32), mask[:max_length]
