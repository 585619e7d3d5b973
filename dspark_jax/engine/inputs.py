"""What users pass to `generate` / `stream`, checked at the boundary.

Every argument is type-checked before anything is traced: a wrong value raises an `InputError` (a request
that cannot be served) or a `ConfigError` (a wrong model object), both `DSparkError`s, whose message names the
argument, shows the value and says what form is expected. Nothing is coerced silently: a float is not a token
id or a token budget, bytes are not text, a path is not a model.

Accepted forms: scalars are Python or NumPy numbers (never `bool` or `str`); a per-prompt setting may instead be a
list, tuple, range or 1-D NumPy array with one value per prompt. Prompts are a list or tuple of prompts (or a 2-D
integer NumPy array, one row per prompt); a prompt is a `str` (valid Unicode; tokenised with the target's
tokenizer as transformers' `tokenizer(text)` does) or a list, tuple or 1-D integer NumPy array of token ids.
Temperatures below `sampling.GREEDY_TEMPERATURE` (1e-5) are greedy (docs/algorithm.md §3.4).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from dspark_jax.errors import ConfigError, InputError
from dspark_jax.handles import Draft, Target
from dspark_jax.tokenizer import check_text

MAX_UINT32 = 2**32


def is_integer(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def is_number(x) -> bool:
    return is_integer(x) or isinstance(x, (float, np.floating))


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------------------------- models


def _wrong_model(name: str, value, loader: str) -> str:
    if isinstance(value, (str, bytes, os.PathLike)):
        path = os.fsdecode(value) if not isinstance(value, str) else value
        if name == "draft" and path.lower() in ("prompt-lookup", "prompt_lookup"):
            return f"draft={path!r} is a name, not a proposer: pass draft=dj.prompt_lookup()"
        if name == "draft" and path.lower() == "none":
            return "draft='none' is a string: pass draft=None for plain autoregressive decoding"
        return f"{name}={path!r} is a path, not a loaded model: load it first, {name} = {loader.format(repr(path))}"
    if name == "target" and isinstance(value, Draft):
        return ("target is a draft (a loaded draft or dj.prompt_lookup()): pass the target model first, "
                "dj.generate(target, draft, prompts, ...)")
    if name == "draft" and isinstance(value, Target):
        return ("draft is a target model: did you swap them? Pass dj.generate(target, draft, prompts, ...), with "
                "draft=None for plain autoregressive decoding")
    return f"{name} must be a model from {loader.format('path')}, got {type(value).__name__}"


def check_models(target, draft) -> None:
    """`target` a loaded `Target`; `draft` a loaded `Draft` (a trained draft or prompt lookup) or None."""
    if not isinstance(target, Target):
        raise ConfigError(_wrong_model("target", target, "dj.load_target({})"))
    if draft is not None and not isinstance(draft, Draft):
        raise ConfigError(_wrong_model("draft", draft, "dj.load_draft({}) (or dj.prompt_lookup(), or None)"))


def draft_length(value, limit: int) -> int:
    """The draft length K: None (the draft's maximum) or an integer in [1, limit]."""
    if value is None:
        return limit
    if not is_integer(value) or not 1 <= value <= limit:
        raise ConfigError(f"draft_length={_show(value)} (the draft length K) must be an integer between 1 and this draft's maximum {limit}")
    return int(value)


# ---------------------------------------------------------------------------------------------- prompts


def _prompt_ids(target: Target, prompt, i: int) -> list[int]:
    name = f"prompt {i}"
    if isinstance(prompt, str):
        check_text(prompt, name)
        if target.directory is None:
            raise InputError(f"{name} is text but this target has no tokenizer (it was not loaded from a directory); pass token ids")
        ids = target.tokenizer.encode(prompt, add_special_tokens=True)
    elif isinstance(prompt, (bytes, bytearray, memoryview)):
        raise InputError(f"{name} is {type(prompt).__name__}: decode it to text first (prompt.decode('utf-8')), or pass its "
                         "token ids as a list of ints")
    elif isinstance(prompt, dict):
        raise InputError(f"{name} is a dict: a prompt is text or token ids; render chat messages first with "
                         "target.tokenizer.apply_chat_template(messages)")
    elif isinstance(prompt, np.ndarray):
        if prompt.ndim != 1 or not np.issubdtype(prompt.dtype, np.integer):
            raise InputError(f"{name} is a NumPy array of shape {prompt.shape} and dtype {prompt.dtype}: token ids must be a "
                             "1-D integer array")
        ids = prompt.tolist()
    elif isinstance(prompt, (list, tuple)):
        for j, x in enumerate(prompt):
            if not is_integer(x):
                raise InputError(f"{name}: token {j} is {_show(x)} ({type(x).__name__}); token ids must be integers")
        ids = [int(x) for x in prompt]
    else:
        raise InputError(f"{name} is {type(prompt).__name__}: a prompt is text (str) or a list of integer token ids")
    if not ids:
        raise InputError(f"{name} is empty: every prompt needs at least one token")
    vocab = target.config.vocab_size
    bad = [x for x in ids if not 0 <= x < vocab]
    if bad:
        raise InputError(f"{name} has token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")
    return ids


def token_lists(target: Target, prompts) -> list[list[int]]:
    """Each prompt's token ids (validated: integers inside the vocabulary, at least one)."""
    example = "e.g. ['some text'] or [[1, 2, 3]]"
    if isinstance(prompts, str):
        raise InputError(f"prompts must be a list of prompts, not one string: wrap it, [text] ({example})")
    if isinstance(prompts, (bytes, bytearray)):
        raise InputError(f"prompts is {type(prompts).__name__}: decode it to text and wrap it in a list ({example})")
    if isinstance(prompts, np.ndarray):
        if prompts.ndim != 2 or not np.issubdtype(prompts.dtype, np.integer):
            raise InputError(f"prompts as a NumPy array must be 2-D integer token ids, one row per prompt; got shape "
                             f"{prompts.shape} and dtype {prompts.dtype} (wrap a single prompt's ids: [ids])")
        prompts = list(prompts)
    if not isinstance(prompts, Sequence):
        raise InputError(f"prompts must be a list of prompts (token-id lists or strings), {example}; got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise InputError("prompts is empty: pass at least one prompt")
    if all(is_integer(p) for p in prompts):
        raise InputError(f"prompts is a flat list of integers: prompts is a list of prompts, so wrap one prompt's token ids, "
                         f"[{_show(list(prompts))}]")
    return [_prompt_ids(target, p, i) for i, p in enumerate(prompts)]


# --------------------------------------------------------------------------------------------- settings


def per_prompt(name: str, value, n: int, *, integer: bool, check, expected: str) -> np.ndarray:
    """One value per prompt from a scalar or a sequence of `n` values, each of the right type and range.

    -> float64 array `[n]` (integers are exact there up to 2**53)."""
    form = f"{expected}, or a list of one such value per prompt ({n})"
    ok = is_integer if integer else is_number

    def one(x, where):
        if not ok(x):
            raise InputError(f"{where}={_show(x)} ({type(x).__name__}): expected {expected}")
        v = float(x) if not integer else int(x)
        if not np.isfinite(v) or not check(v):
            raise InputError(f"{where}={_show(x)}: expected {expected}")
        return v

    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if ok(value) or is_number(value):
        return np.full(n, one(value, name), np.float64)
    if isinstance(value, (list, tuple, range, np.ndarray)):
        if isinstance(value, np.ndarray) and value.ndim != 1:
            raise InputError(f"{name} has shape {value.shape}: expected {form}")
        if len(value) != n:
            raise InputError(f"{name} has {len(value)} values for {n} prompts: expected {form}")
        items = value.tolist() if isinstance(value, np.ndarray) else list(value)
        return np.array([one(x, f"{name}[{i}]") for i, x in enumerate(items)], np.float64)
    raise InputError(f"{name}={_show(value)} ({type(value).__name__}): expected {form}")


def settings(n: int, *, max_new_tokens, temperature, top_k, top_p, seed, confidence_threshold) -> dict[str, np.ndarray]:
    """Every per-prompt setting of a request, validated. -> name -> array `[n]`."""
    return {
        "max_new_tokens": per_prompt("max_new_tokens", max_new_tokens, n, integer=True, check=lambda v: v >= 1,
                                     expected="an integer >= 1 (the number of tokens to generate)"),
        "temperature": per_prompt("temperature", temperature, n, integer=False, check=lambda v: v >= 0,
                                  expected="a finite number >= 0 (0, or anything below 1e-5, is greedy)"),
        "top_k": per_prompt("top_k", top_k, n, integer=True, check=lambda v: v >= 0, expected="an integer >= 0 (0 = off)"),
        "top_p": per_prompt("top_p", top_p, n, integer=False, check=lambda v: 0 < v <= 1, expected="a number in (0, 1] (1 = off)"),
        "seed": per_prompt("seed", seed, n, integer=True, check=lambda v: 0 <= v < MAX_UINT32,
                           expected="an integer in [0, 2**32)"),
        "confidence_threshold": per_prompt("confidence_threshold", confidence_threshold, n, integer=False,
                                           check=lambda v: 0 <= v <= 1, expected="a number in [0, 1] (0 = off)"),
    }


def row_ids(value, n: int) -> list[int] | None:
    """None (rows 0..n-1) or one integer in [0, 2**32) per prompt."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple, range, np.ndarray)):
        raise InputError(f"row_ids={_show(value)} ({type(value).__name__}): expected a list of one integer in [0, 2**32) "
                         f"per prompt ({n}), or None")
    ids = per_prompt("row_ids", value, n, integer=True, check=lambda v: 0 <= v < MAX_UINT32,
                     expected="an integer in [0, 2**32)")
    return [int(x) for x in ids]


def stop_token_ids(value, vocab: int) -> list[int] | None:
    """None (the target's own) or a list of token ids inside the vocabulary (may be empty)."""
    if value is None:
        return None
    if isinstance(value, np.ndarray) and value.ndim == 1 and np.issubdtype(value.dtype, np.integer):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(is_integer(x) for x in value):
        raise InputError(f"stop_token_ids={_show(value)}: expected a list of integer token ids (e.g. [2]), [] for none, or "
                         "None for the target's own")
    for x in value:
        if not 0 <= x < vocab:
            raise InputError(f"stop_token_ids: stop token id {x} is outside the vocabulary [0, {vocab})")
    return [int(x) for x in value]


SAMPLERS = ("coupled", "rejection")


def sampler(value) -> str:
    """How sampled rows draw their tokens (docs/algorithm.md §3.6): "coupled" (Gumbel-max noise per position:
    speculative output equals plain decoding's for the same seed) or "rejection" (the paper's speculative
    sampling)."""
    if not isinstance(value, str) or value not in SAMPLERS:
        raise InputError(f"sampler={_show(value)}: expected one of {', '.join(map(repr, SAMPLERS))}")
    return value


BATCHING = ("continuous", "static")


def batching(batch_size, mode) -> str | None:
    """None (one batch of every prompt), or how `batch_size` slots are fed: "continuous" (default) or "static"."""
    if batch_size is None:
        if mode is not None:
            raise InputError(f"batching={mode!r} needs batch_size (the number of decode slots), e.g. batch_size=16")
        return None
    if not is_integer(batch_size) or batch_size < 1:
        raise InputError(f"batch_size={_show(batch_size)}: expected an integer >= 1 (decode slots), or None for one "
                         "batch of every prompt")
    if mode is None:
        return "continuous"
    if mode not in BATCHING:
        raise InputError(f"batching={_show(mode)}: expected one of {', '.join(map(repr, BATCHING))}")
    return mode
