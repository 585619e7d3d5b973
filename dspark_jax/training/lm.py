"""Train a small Qwen3 target from scratch: next-token cross-entropy on packed token windows.

The forward is `Qwen3Model.__call__` itself over an empty cache (a causal pass from position 0), so the
trained weights run unchanged in the inference engine. Windows `[N, T + 1]` come from one token stream of
documents separated by `<|endoftext|>`; epoch `e` visits them in the order of a permutation seeded with
`seed + e`, so a resumed run continues on exactly the batches it would have seen.
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
from dspark_jax.handles import Target
from dspark_jax.layers.attention import full_extent
from dspark_jax.models.qwen3 import Qwen3Config
from dspark_jax.training import optim
from dspark_jax.training.checkpoint import Checkpointer


@dataclasses.dataclass(frozen=True)
class LMRecipe:
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 300
    lr: float = 2e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = 100
    checkpoint_every: int = 100


def pack(docs: list[list[int]], seq_len: int, separator: int) -> np.ndarray:
    """Concatenate documents (each followed by `separator`) and cut `[N, seq_len + 1]` windows (stride seq_len)."""
    stream = np.fromiter((t for d in docs for t in (*d, separator)), dtype=np.int32)
    n = (len(stream) - 1) // seq_len
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[idx]


def batch_indices(num_windows: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Window ids of optimizer step `step`: epoch-wise seeded permutations, consumed in order."""
    per_epoch = num_windows // batch_size
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng(seed + epoch).permutation(num_windows)
    return order[i * batch_size : (i + 1) * batch_size]


def lm_loss(model, windows: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of `windows [B, T + 1]`."""
    B, T = windows.shape[0], windows.shape[1] - 1
    with full_extent():  # differentiable: no key-block loop with a traced trip count
        hidden, _, _ = model(windows[:, :-1], jnp.zeros((B,), jnp.int32), model.init_cache(B, T))
    logits = model.logits(hidden)
    return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()


@functools.partial(compiling.jit, static_argnames=("graphdef", "tx"), donate_argnames=("params", "opt_state"))
def _train_step(graphdef, params, opt_state, windows, tx):
    loss, grads = jax.value_and_grad(lambda p: lm_loss(nnx.merge(graphdef, p), windows))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)


@functools.partial(compiling.jit, static_argnames=("graphdef",))
def _eval_loss(graphdef, params, windows):
    return lm_loss(nnx.merge(graphdef, params), windows)


def evaluate(target: Target, windows: np.ndarray, batch_size: int) -> float:
    losses = [float(_eval_loss(target.graphdef, target.params, jnp.asarray(windows[i : i + batch_size])))
              for i in range(0, len(windows) - batch_size + 1, batch_size)]
    return float(np.mean(losses)) if losses else float("nan")


def init_target(config: Qwen3Config, seed: int) -> Target:
    return Target.random(config, dtype="float32", seed=seed)


def train(target: Target, windows: np.ndarray, val_windows: np.ndarray, recipe: LMRecipe, out_dir) -> Target:
    """Train `target` (fp32) for `recipe.steps` steps; resumes from `out_dir/checkpoints`; logs `out_dir/metrics.jsonl`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tx = optim.adamw(recipe.lr, recipe.steps, warmup_ratio=recipe.warmup_ratio, weight_decay=recipe.weight_decay,
                     max_grad_norm=recipe.max_grad_norm)
    params, opt_state = target.params, tx.init(target.params)
    ckpt = Checkpointer(out_dir / "checkpoints")
    start = ckpt.latest_step() or 0
    if start:
        params, opt_state = ckpt.restore(start, (params, opt_state))
    log = open(out_dir / "metrics.jsonl", "a")
    bar = tqdm(range(start, recipe.steps), initial=start, total=recipe.steps, desc="target LM", dynamic_ncols=True)
    t0 = time.perf_counter()
    for step in bar:
        batch = jnp.asarray(windows[batch_indices(len(windows), recipe.batch_size, step, recipe.seed)])
        params, opt_state, loss, gnorm = _train_step(target.graphdef, params, opt_state, batch, tx)
        record = {"step": step + 1, "loss": float(loss), "grad_norm": float(gnorm), "time_s": time.perf_counter() - t0}
        if (step + 1) % recipe.eval_every == 0 or step + 1 == recipe.steps:
            record["val_loss"] = evaluate(target.with_params(params), val_windows, recipe.batch_size)
        bar.set_postfix(loss=f"{record['loss']:.3f}", **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
        log.write(json.dumps(record) + "\n")
        log.flush()
        if (step + 1) % recipe.checkpoint_every == 0 or step + 1 == recipe.steps:
            ckpt.save(step + 1, (params, opt_state))
    log.close()
    ckpt.close()
    return target.with_params(params)
