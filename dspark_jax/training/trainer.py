"""Draft training loop: target cache -> anchors -> training forward -> DSpark/DFlash loss -> AdamW.

* Parameters are split once into frozen (`embed_tokens`, `lm_head`: copies of the target's, never updated —
  the gradient is taken only with respect to the trainable part) and trainable fp32 master weights; the
  forward runs in `compute_dtype` (weights cast each step).
* Step `s` (a micro-step) reads batch `s` of `epoch_batches` (seeded by `seed + epoch`) and draws its anchors with
  `fold_in(key(seed), s)`: batches and anchors are pure functions of the recipe and the step, so restoring
  the orbax checkpoint of step `s` and continuing reproduces the uninterrupted run's losses exactly.
* Every `eval.every` steps: loss terms, per-slot soft acceptance and the expected acceptance length on the
  held-out cache, and optionally the real speculative-decoding tau on held-out prompts.
* Metrics go to `output_dir/metrics.jsonl` (one JSON object per step or evaluation); the final draft is
  written to `output_dir/draft` in the DeepSpec layout.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from dspark_jax import compiling
from dspark_jax.errors import ConfigError
from dspark_jax.handles import Draft, Target
from dspark_jax.layers.params import Init
from dspark_jax.training import optim
from dspark_jax.training.anchors import block_targets, sample_anchors
from dspark_jax.training.checkpoint import Checkpointer
from dspark_jax.training.forward import block_hidden_train
from dspark_jax.training.losses import LossWeights, block_statistics, block_terms, combine
from dspark_jax.training.recipe import DraftRecipe
from dspark_jax.training.target_cache import TargetCache

FROZEN = (("backbone", "embed_tokens"), ("backbone", "lm_head"), ("embed_tokens",), ("lm_head",))  # DSpark, EAGLE-3


def is_frozen(path, _value) -> bool:
    return tuple(path[:2]) in FROZEN


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    input_ids: jax.Array  # i32[B, S] right-padded
    loss_mask: jax.Array  # u8[B, S]
    lengths: jax.Array  # i32[B]
    features: jax.Array  # [B, S, n_t * D]
    last_hidden: jax.Array  # [B, S, D]


def make_batch(cache: TargetCache, ids, *, max_length: int, buckets, dtype, rows: int | None = None) -> Batch:
    """Right-pad cache samples `ids` (truncated to `max_length`) to the smallest length bucket that fits."""
    samples = [cache[int(i)] for i in ids]
    lengths = [min(len(s), max_length) for s in samples]
    S = next(b for b in buckets if b >= max(lengths))
    B = rows or len(samples)
    F, D = samples[0].features.shape[1], samples[0].last_hidden.shape[1]
    input_ids = np.zeros((B, S), np.int32)
    loss_mask = np.zeros((B, S), np.uint8)
    features = np.zeros((B, S, F), np.float32)
    last_hidden = np.zeros((B, S, D), np.float32)
    for r, (s, L) in enumerate(zip(samples, lengths, strict=True)):
        input_ids[r, :L] = s.input_ids[:L]
        loss_mask[r, :L] = s.loss_mask[:L]
        features[r, :L] = s.features[:L]
        last_hidden[r, :L] = s.last_hidden[:L]
    full_lengths = np.zeros(B, np.int32)
    full_lengths[: len(lengths)] = lengths
    return Batch(jnp.asarray(input_ids), jnp.asarray(loss_mask), jnp.asarray(full_lengths),
                 jnp.asarray(features, dtype), jnp.asarray(last_hidden, dtype))


def draft_objective(draft, batch: Batch, key: jax.Array, *, num_anchors: int, weights: LossWeights, chunk_blocks: int,
                    remat: bool = False):
    """(loss, (loss parts, acceptance statistics)) of one micro-batch."""
    from dspark_jax.proposers.eagle3 import Eagle3Draft
    from dspark_jax.training import eagle3

    cfg = draft.config
    if isinstance(draft, Eagle3Draft):  # training-time test, docs/eagle3.md §8
        return eagle3.objective(draft, batch.input_ids, batch.loss_mask, batch.lengths, batch.features, batch.last_hidden,
                                steps=cfg.draft_length, decay=cfg.step_loss_decay, remat=remat)
    anchors, keep = sample_anchors(key, batch.loss_mask, batch.lengths, num_anchors)
    t = block_targets(batch.input_ids, batch.loss_mask, batch.lengths, anchors, keep, cfg.block_size, cfg.mask_token_id)
    hidden = block_hidden_train(draft, batch.features, t.block_ids, t.positions, keep, remat=remat)
    teacher = jax.vmap(lambda g, rows: g[rows])(batch.last_hidden, t.teacher_rows).astype(hidden.dtype)
    terms = block_terms(draft, hidden, teacher, t.target_ids, t.prev_ids, chunk_blocks)
    loss, parts = combine(terms, t.supervised, weights)
    return loss, (parts, block_statistics(terms, t.supervised))


def _merge(graphdef, frozen, trainable, dtype):
    cast = lambda tree: jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
    return nnx.merge(graphdef, cast(frozen), cast(trainable))


STATIC = ("graphdef", "tx", "num_anchors", "weights", "chunk_blocks", "dtype", "remat")


@functools.partial(compiling.jit, static_argnames=STATIC, donate_argnames=("trainable", "opt_state"))
def train_step(graphdef, frozen, trainable, opt_state, batch, key, *, tx, num_anchors, weights, chunk_blocks, dtype,
               remat=False):
    """One micro-step: gradient with respect to the trainable parameters only, then the optimizer update."""

    def loss_fn(tr):
        draft = _merge(graphdef, frozen, tr, dtype)
        return draft_objective(draft, batch, key, num_anchors=num_anchors, weights=weights, chunk_blocks=chunk_blocks,
                               remat=remat)

    (loss, (parts, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss, parts, stats, optax.tree.norm(grads)


@functools.partial(compiling.jit, static_argnames=("graphdef", "num_anchors", "weights", "chunk_blocks", "dtype"))
def eval_step(graphdef, frozen, trainable, batch, key, *, num_anchors, weights, chunk_blocks, dtype):
    draft = _merge(graphdef, frozen, trainable, dtype)
    loss, (parts, stats) = draft_objective(draft, batch, key, num_anchors=num_anchors, weights=weights, chunk_blocks=chunk_blocks)
    return loss, parts, stats


def summarize(stats: dict) -> dict:
    """Readable acceptance metrics from summed `block_statistics`."""
    slots = np.maximum(np.asarray(stats["slots"]), 1)
    blocks = max(float(stats["blocks"]), 1.0)
    out = {
        "accept_rate": [round(float(x), 4) for x in np.asarray(stats["accept_sum"]) / slots],
        "tau_prob": float(stats["tau_prob_sum"]) / blocks,
        "tau_greedy_tf": float(stats["tau_greedy_sum"]) / blocks,
    }
    if "conf_error_sum" in stats:
        out["conf_abs_error"] = float(stats["conf_error_sum"]) / float(np.sum(slots))
    return out


def epoch_batches(lengths: np.ndarray, batch_size: int, epoch: int, seed: int, grouping: int) -> list[np.ndarray]:
    """The batches (sample ids) of one epoch: a permutation seeded with `seed + epoch`, cut into groups of
    `grouping` batches, each group sorted by length before it is cut into batches (little padding), and the
    batches shuffled. A pure function of its arguments, so a resumed run sees the same batches."""
    n = len(lengths)
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise ConfigError(f"the training cache has {n} samples, fewer than batch_size {batch_size}")
    rng = np.random.default_rng(seed + epoch)
    order = rng.permutation(n)[: per_epoch * batch_size]
    batches = []
    span = grouping * batch_size
    for g in range(0, len(order), span):
        group = order[g : g + span]
        group = group[np.argsort(lengths[group], kind="stable")]
        batches.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def mask_token_of(target_dir: Path) -> int:
    from dspark_jax.tokenizer import Tokenizer

    tok = Tokenizer.from_directory(target_dir)
    config = json.loads((Path(target_dir) / "tokenizer_config.json").read_text()) if (Path(target_dir) / "tokenizer_config.json").exists() else {}
    name = config.get("mask_token")
    name = name.get("content") if isinstance(name, dict) else name
    mask = tok.token_id(name) if name else None
    if mask is None:
        raise ConfigError(f"{target_dir} defines no mask_token; set draft.mask_token_id in the recipe")
    return mask


class DraftTrainer:
    """Owns a recipe's target, caches, parameters and optimizer; `train()` runs (or resumes) it."""

    def __init__(self, recipe: DraftRecipe, *, target: Target | None = None, draft: Draft | None = None):
        import dspark_jax as dj
        from dspark_jax.training.init import draft_config_from_target, init_from_target

        self.recipe = r = recipe
        self.target = target if target is not None else dj.load_target(r.target, dtype="float32")
        self.train_cache = TargetCache(r.train_cache)
        self.eval_cache = TargetCache(r.eval_cache) if r.eval_cache else None
        if draft is None and r.draft.init_from:
            draft = dj.load_draft(r.draft.init_from, dtype="float32")
        if draft is None and r.draft.kind == "eagle3":
            from dspark_jax.training import eagle3

            draft = eagle3.init_from_target(self.target, eagle3.draft_config_from_recipe(self.target.config, r.draft),
                                            seed=r.seed)
        if draft is None:
            d = r.draft
            mask = d.mask_token_id if d.mask_token_id is not None else mask_token_of(Path(r.target))
            cfg = draft_config_from_target(
                self.target.config, num_layers=d.num_layers, target_layer_ids=d.target_layer_ids, mask_token_id=mask,
                block_size=d.block_size, markov_rank=d.markov_rank, markov_head_type=d.markov_head_type,
                confidence_head=d.confidence_head, confidence_head_with_markov=d.confidence_head_with_markov,
                intermediate_size=d.intermediate_size, num_anchors=d.num_anchors,
            )
            draft = init_from_target(self.target, cfg, seed=r.seed)
        self.config = draft.config
        self.module_class = type(draft.module)
        for cache in (self.train_cache, self.eval_cache):
            if cache is not None:
                cache.check_draft(self.config)
        self.dtype = jnp.dtype(r.compute_dtype)
        graphdef, frozen, trainable = nnx.split(draft.module, is_frozen, ...)
        # The compute graph is built for `compute_dtype` (RoPE tables, casts); masters stay fp32.
        self.graphdef = nnx.split(nnx.eval_shape(lambda: self.module_class(self.config, Init(nnx.Rngs(0), self.dtype))),
                                  is_frozen, ...)[0]
        self.frozen = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), frozen)
        self.trainable = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), trainable)
        self.micro_steps = self._total_micro_steps()
        self.tx = optim.adamw(r.optimizer.lr, self.micro_steps // r.grad_accum, warmup_ratio=r.optimizer.warmup_ratio,
                              weight_decay=r.optimizer.weight_decay, max_grad_norm=r.optimizer.max_grad_norm,
                              grad_accum=r.grad_accum)
        self.opt_state = self.tx.init(self.trainable)
        self.step = 0
        self._epoch: tuple = (None, [])
        self.statics = dict(num_anchors=getattr(self.config, "num_anchors", 0), weights=r.loss, chunk_blocks=r.chunk_blocks, dtype=self.dtype)

    def _total_micro_steps(self) -> int:
        r = self.recipe
        if r.steps is not None:
            return int(r.steps) * r.grad_accum
        return max(1, int(r.epochs * len(self.train_cache)) // r.batch_size // r.grad_accum) * r.grad_accum

    # --- state ----------------------------------------------------------------------------------
    def draft(self, dtype=None) -> Draft:
        """The current draft as a `Draft` handle (parameters cast to `dtype`, default fp32)."""
        dt = jnp.dtype(dtype or "float32")
        module = nnx.merge(self.graphdef, self.frozen, self.trainable)
        _, params = nnx.split(module)
        graphdef = nnx.split(nnx.eval_shape(lambda: self.module_class(self.config, Init(nnx.Rngs(0), dt))))[0]
        params = jax.tree.map(lambda x: x.astype(dt), params)
        return Draft(config=self.config, graphdef=graphdef, params=params, dtype=dt)

    def batch(self, step: int) -> Batch:
        r = self.recipe
        per_epoch = len(self.train_cache) // r.batch_size
        epoch, i = divmod(step, max(per_epoch, 1))
        if self._epoch[0] != epoch:
            self._epoch = (epoch, epoch_batches(self.train_cache.lengths, r.batch_size, epoch, r.seed, r.length_grouping))
        return make_batch(self.train_cache, self._epoch[1][i], max_length=r.max_length, buckets=r.buckets, dtype=self.dtype)

    def key(self, step: int) -> jax.Array:
        return jax.random.fold_in(jax.random.key(self.recipe.seed), step)

    # --- loop -----------------------------------------------------------------------------------
    def train(self, *, stop_after: int | None = None, progress: bool = True) -> list[dict]:
        """Run (or resume) to the end of the recipe; `stop_after` ends early after that many micro-steps in total
        (as if the process had been killed there). Returns this call's metric records."""
        r = self.recipe
        out = r.output
        out.mkdir(parents=True, exist_ok=True)
        ckpt = Checkpointer(out / "checkpoints")
        latest = ckpt.latest_step()
        if latest:
            self.trainable, self.opt_state = ckpt.restore(latest, (self.trainable, self.opt_state))
            self.step = latest
        end = self.micro_steps if stop_after is None else min(self.micro_steps, stop_after)
        records = []
        log = open(out / "metrics.jsonl", "a")
        bar = tqdm(total=self.micro_steps, initial=self.step, desc=f"train {out.name}", dynamic_ncols=True, disable=not progress)
        t0 = time.perf_counter()
        lr_schedule = optim.warmup_cosine(r.optimizer.lr, self.micro_steps // r.grad_accum, r.optimizer.warmup_ratio)
        while self.step < end:
            batch = self.batch(self.step)
            self.trainable, self.opt_state, loss, parts, stats, gnorm = train_step(
                self.graphdef, self.frozen, self.trainable, self.opt_state, batch, self.key(self.step), tx=self.tx,
                remat=r.remat, **self.statics,
            )
            self.step += 1
            record = {"step": self.step, "loss": float(loss), **{k: float(v) for k, v in parts.items()},
                      "grad_norm": float(gnorm), "lr": float(lr_schedule((self.step - 1) // r.grad_accum)),
                      "tau_prob": summarize(stats)["tau_prob"], "time_s": round(time.perf_counter() - t0, 3)}
            if r.eval.every and self.step % r.eval.every == 0 and self.step < self.micro_steps:
                record["eval"] = self.evaluate()
            if self.step == self.micro_steps:
                record["eval"] = self.evaluate()
            records.append(record)
            if self.step % r.log_every == 0 or "eval" in record:
                log.write(json.dumps(record) + "\n")
                log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tau=f"{record['tau_prob']:.2f}",
                            **({"eval_tau": f"{record['eval']['tau_prob']:.2f}"} if "tau_prob" in record.get("eval", {}) else {}))
            if self.step % r.checkpoint_every == 0 or self.step == self.micro_steps:
                ckpt.save(self.step, (self.trainable, self.opt_state))
        bar.close()
        log.close()
        ckpt.close()
        return records

    def evaluate(self) -> dict:
        """Held-out cache metrics (fixed anchors) and, if configured, speculative-decoding tau on prompts."""
        r = self.recipe
        result: dict = {}
        if self.eval_cache is not None:
            n = min(len(self.eval_cache), r.eval.max_samples)
            order = np.argsort(self.eval_cache.lengths[:n], kind="stable")  # similar lengths together: fewer shapes
            totals, parts_sum, batches = None, {}, 0
            for i in range(0, n, r.batch_size):
                ids = order[i : i + r.batch_size]
                batch = make_batch(self.eval_cache, ids, max_length=r.max_length, buckets=r.buckets, dtype=self.dtype,
                                   rows=r.batch_size)
                _, parts, stats = eval_step(self.graphdef, self.frozen, self.trainable, batch,
                                            jax.random.key(r.seed + 1 + i), **self.statics)
                stats = jax.tree.map(np.asarray, stats)
                totals = stats if totals is None else jax.tree.map(np.add, totals, stats)
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + float(v)
                batches += 1
            result.update({k: v / batches for k, v in parts_sum.items()})
            result.update(summarize(totals))
        if r.eval.prompts:
            result["spec_tau"] = self.speculative_tau()
        return result

    def speculative_tau(self) -> dict[str, float]:
        """Mean acceptance length of real speculative decoding on the first `eval.num_prompts` held-out prompts."""
        import dspark_jax as dj
        from dspark_jax.training.corpus import read_prompt_set

        r = self.recipe
        tok = self.target.tokenizer
        prompts = read_prompt_set(Path(r.eval.prompts))[: r.eval.num_prompts]
        ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)) for p in prompts]
        draft = self.draft()
        out = {}
        for t in r.eval.temperatures:
            res = dj.generate(self.target, draft, ids, max_new_tokens=r.eval.max_new_tokens, temperature=float(t), seed=r.seed)
            out[f"T={t:g}"] = round(res.stats.mean_acceptance_length, 4)
        return out

    def export(self, directory=None, dtype: str | None = None) -> Path:
        """Write the draft (DeepSpec layout) to `directory` (default `output_dir/draft`)."""
        from dspark_jax.proposers import dspark_checkpoint, eagle3_checkpoint
        from dspark_jax.proposers.eagle3 import Eagle3Draft

        export_draft = eagle3_checkpoint.export_draft if self.module_class is Eagle3Draft else dspark_checkpoint.export_draft

        directory = Path(directory or self.recipe.output / "draft")
        base = json.loads((Path(self.recipe.target) / "config.json").read_text()) if Path(self.recipe.target, "config.json").exists() else None
        return export_draft(self.draft(), directory, dtype=dtype or self.recipe.export.dtype, base_config=base)
