"""Draft training recipes: YAML files (`configs/*.yaml`) -> frozen dataclasses, strictly checked.

Paths in a recipe are taken as written (relative paths are relative to the working directory). Every key
is checked: an unknown or misspelt key is an error that names it, so a typo never silently falls back to a
default. Layout (defaults in the dataclasses below):

    target: DIR              # HF target checkpoint the draft is trained for
    train_cache: DIR         # target cache of the training data (`dspark-jax build-cache`)
    eval_cache: DIR          # optional held-out cache for periodic evaluation
    output_dir: DIR          # checkpoints/, metrics.jsonl, and the exported draft (draft/)
    draft: {kind, num_layers, block_size, target_layer_ids, mask_token_id, markov_rank, markov_head_type,
            confidence_head, confidence_head_with_markov, intermediate_size, num_anchors, init_from,
            ttt_length, step_loss_decay}
    loss: {ce, l1, conf, decay_gamma}
    optimizer: {lr, warmup_ratio, weight_decay, max_grad_norm}
    batch_size, grad_accum, steps | epochs, max_length, length_buckets, length_grouping, seed, compute_dtype,
    chunk_blocks, remat
    eval: {every, max_samples, prompts, num_prompts, max_new_tokens, temperatures}
    checkpoint_every, log_every
    export: {dtype}
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from dspark_jax.errors import ConfigError
from dspark_jax.training.losses import LossWeights

DRAFT_KINDS = ("dspark", "eagle3")


@dataclasses.dataclass(frozen=True)
class DraftSpec:
    kind: str = "dspark"  # "dspark" (DSpark / DFlash) or "eagle3" (docs/eagle3.md §8)
    num_layers: int = 1
    block_size: int = 7
    target_layer_ids: tuple[int, ...] = ()
    mask_token_id: int | None = None  # None: the target tokenizer's `mask_token`
    markov_rank: int = 0
    markov_head_type: str = "vanilla"
    confidence_head: bool = False
    confidence_head_with_markov: bool = True
    intermediate_size: int | None = None
    num_anchors: int = 512
    init_from: str | None = None  # an existing draft directory to continue from instead of a fresh init
    ttt_length: int = 7  # eagle3: training-time-test steps, also the chain length it drafts
    step_loss_decay: float = 0.8  # eagle3: the loss of step j is weighted by step_loss_decay ** j


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    lr: float = 6e-4
    warmup_ratio: float = 0.04
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    every: int = 0  # 0: only at the end
    max_samples: int = 64
    prompts: str | None = None  # JSONL ({"turns": [...]}) for speculative-decoding tau; None: cache metrics only
    num_prompts: int = 8
    max_new_tokens: int = 64
    temperatures: tuple[float, ...] = (0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    dtype: str = "bfloat16"


@dataclasses.dataclass(frozen=True)
class DraftRecipe:
    target: str
    train_cache: str
    output_dir: str
    draft: DraftSpec
    eval_cache: str | None = None
    loss: LossWeights = LossWeights()
    optimizer: OptimizerSpec = OptimizerSpec()
    batch_size: int = 1
    grad_accum: int = 1
    steps: int | None = None
    epochs: float | None = None
    max_length: int = 4096
    length_buckets: tuple[int, ...] = ()  # padded lengths; () = powers of two from 64, and max_length
    length_grouping: int = 16  # batches drawn from one length-sorted group (1 = plain random batches)
    seed: int = 42
    compute_dtype: str = "float32"
    chunk_blocks: int = 64
    remat: bool = False  # recompute each draft layer in the backward pass (jax.checkpoint): less memory, more compute
    eval: EvalSpec = EvalSpec()
    checkpoint_every: int = 500
    log_every: int = 1
    export: ExportSpec = ExportSpec()

    @property
    def output(self) -> Path:
        return Path(self.output_dir)

    @property
    def buckets(self) -> tuple[int, ...]:
        if self.length_buckets:
            return tuple(self.length_buckets)
        powers = [1 << i for i in range(6, 31) if (1 << i) < self.max_length]
        return (*powers, self.max_length)


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        sub = {"draft": DraftSpec, "loss": LossWeights, "optimizer": OptimizerSpec, "eval": EvalSpec, "export": ExportSpec}
        if cls is DraftRecipe and name in sub:
            kwargs[name] = _build(sub[name], value or {}, f"{where}.{name}")
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in kwargs]
    if missing:
        raise ConfigError(f"{where}: required key(s) {missing} missing")
    return cls(**kwargs)


def parse_recipe(data: dict, where: str = "recipe") -> DraftRecipe:
    recipe = _build(DraftRecipe, data, where)
    if (recipe.steps is None) == (recipe.epochs is None):
        raise ConfigError(f"{where}: give exactly one of 'steps' or 'epochs'")
    for name in ("batch_size", "grad_accum", "max_length", "chunk_blocks", "length_grouping"):
        if int(getattr(recipe, name)) < 1:
            raise ConfigError(f"{where}: {name} must be >= 1")
    if recipe.checkpoint_every % recipe.grad_accum:
        raise ConfigError(f"{where}: checkpoint_every must be a multiple of grad_accum")
    if recipe.length_buckets and (list(recipe.length_buckets) != sorted(set(recipe.length_buckets))
                                  or recipe.length_buckets[-1] < recipe.max_length):
        raise ConfigError(f"{where}: length_buckets must increase and end at >= max_length ({recipe.max_length})")
    if not isinstance(recipe.remat, bool):
        raise ConfigError(f"{where}: remat must be true or false, got {recipe.remat!r}")
    if recipe.compute_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"{where}: compute_dtype must be 'float32' or 'bfloat16'")
    if not recipe.draft.target_layer_ids:
        raise ConfigError(f"{where}.draft: target_layer_ids is required")
    if recipe.draft.kind not in DRAFT_KINDS:
        raise ConfigError(f"{where}.draft: kind {recipe.draft.kind!r} is not one of {DRAFT_KINDS}")
    if recipe.draft.kind == "eagle3" and (recipe.draft.num_layers != 1 or int(recipe.draft.ttt_length) < 1):
        raise ConfigError(f"{where}.draft: an EAGLE-3 draft has num_layers 1 and ttt_length >= 1 (docs/eagle3.md §7)")
    return recipe


def load_recipe(path, overrides: dict | None = None) -> DraftRecipe:
    """Read a YAML recipe; `overrides` (dotted keys, e.g. {"optimizer.lr": 1e-3}) replace values first."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from e
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_recipe(data, str(path))
