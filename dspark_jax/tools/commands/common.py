"""Argument groups and helpers shared by CLI subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_model_arguments(parser: argparse.ArgumentParser, *, draft: bool = True) -> None:
    parser.add_argument("--target", default=None,
                        help="target checkpoint directory or Hugging Face repo id owner/name[@revision] (default: the "
                             "built-in trained target)")
    if draft:
        parser.add_argument(
            "--draft", default=None,
            help="draft checkpoint directory or hub repo id owner/name[@revision], a built-in draft of the built-in target "
                 "('dspark', 'dflash', 'eagle3'), 'prompt-lookup' (model-free n-gram drafts) or 'none' (plain AR); default: "
                 "the built-in DSpark draft with the built-in target, plain AR with --target",
        )
        parser.add_argument("--draft-length", type=int, default=None, help="draft tokens per round K (default: block size)")
    parser.add_argument("--dtype", default="auto",
                        help="parameter dtype: bfloat16, float16, float32, or auto (float32 on CPU, where XLA has no fast bf16 "
                             "matmul; bfloat16 on accelerators)")


SAMPLERS = ("coupled", "rejection")
DEFAULT_SAMPLER = "rejection"  # engine.generation.DEFAULT_SAMPLER (kept equal by tests/test_coupled.py)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--confidence-threshold", type=float, default=0.0, help="0 = propose the whole block")
    parser.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER,
                        help="how sampled tokens are drawn: coupled (Gumbel-max noise per position: speculative output "
                             "equals plain decoding's for the seed, whatever the draft, schedule or batch) or rejection "
                             "(the paper's speculative sampling); docs/algorithm.md §3.6")


def resolve_dtype(name: str) -> str:
    """`auto` -> float32 on the CPU backend, bfloat16 elsewhere; any other name unchanged."""
    if name != "auto":
        return name
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


PROMPT_LOOKUP = "prompt-lookup"
BUILTIN_DRAFTS = ("dspark", "dflash", "eagle3")  # `--draft NAME`: dspark_jax.assets.<NAME>_DRAFT


def draft_choice(args):
    """What `--draft` asks for: None (plain AR), `PROMPT_LOOKUP`, or a checkpoint directory (`Path`).

    Without `--draft`, the built-in target gets the built-in DSpark draft; a user's `--target` gets plain AR
    (the built-in draft was trained for the built-in target only)."""

    from dspark_jax import assets

    value = getattr(args, "draft", "none")
    if value is None:
        return assets.DSPARK_DRAFT if getattr(args, "target", None) is None else None
    if str(value).lower() == "none":
        return None
    if str(value).lower() == PROMPT_LOOKUP:
        return PROMPT_LOOKUP
    if str(value).lower() in BUILTIN_DRAFTS and not Path(value).exists():  # a directory of that name wins
        return getattr(assets, f"{str(value).upper()}_DRAFT")
    return resolve_checkpoint(value, "--draft")


def resolve_checkpoint(value, flag: str):
    """A `--target` / `--draft` value as a directory: a local one as given, a hub repo id fetched or found in
    the hub cache (`models.loading.resolve_checkpoint`)."""
    from dspark_jax.models.loading import resolve_checkpoint as resolve

    return resolve(value, flag)


def make_draft(choice, dtype: str, mesh=None):
    import dspark_jax as dj

    if choice is None:
        return None
    if choice == PROMPT_LOOKUP:
        return dj.prompt_lookup()
    return dj.load_draft(choice, dtype=dtype, mesh=mesh)


def load_models(args):
    """(target, draft or None) from `--target/--draft/--dtype`, defaulting to the built-in pair."""
    import dspark_jax as dj

    dtype = resolve_dtype(args.dtype)
    target = dj.load_target(args.target, dtype=dtype)
    return target, make_draft(draft_choice(args), dtype)
