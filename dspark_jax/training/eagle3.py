"""EAGLE-3 draft training: the training-time test over a target cache (docs/eagle3.md §8).

Step 0 runs the context entry of every position t (projected features of t, token t + 1, RoPE position t)
under a causal mask: exactly the context entries an inference round sees, the last of which is the chain's
first entry (docs/eagle3.md §4, §5). Step j >= 1 feeds every position's step-(j-1) output back with the
ground-truth token t + 1 + j at RoPE position t + j; its query sees the step-0 keys of positions <= t and the
keys of its own position's earlier steps, i.e. what drafted entry j of an inference chain anchored at t + 1
sees. The output of step j at t predicts the token at t + 2 + j; its loss is the cross-entropy to the
target's distribution for that token (from the cache's final-normed hidden state and the frozen LM head),
averaged over the supervised positions, weighted by `step_loss_decay ** j`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dspark_jax.layers import kv_cache as kv
from dspark_jax.layers.attention import full_extent


def _shift(ids: jax.Array, n: int) -> jax.Array:
    """`ids[:, t + n]` at column t, zero past the end."""
    return jnp.pad(ids[:, n:], ((0, 0), (0, n)))


def step_hidden(draft, features: jax.Array, input_ids: jax.Array, steps: int, *, remat: bool = False):
    """Raw outputs `[steps, B, S, D]` of the training-time test (module docstring)."""
    B, S = input_ids.shape
    base = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None, :], (B, S))
    causal = kv.block_mask(B, S, causal=True)
    same = jnp.broadcast_to(jnp.eye(S, dtype=bool)[None], (B, S, S))
    residual = draft.project(features)
    earlier, outputs = [], []

    def run(layer_input, residual, positions, parts, fresh_mask):
        cos, sin = draft.rope(positions)
        with full_extent():  # differentiable: every earlier step's keys read in one softmax
            out = draft.layer(draft.embed(layer_input), residual, cos, sin, parts, fresh_mask)
        return out.hidden, out.k, out.v

    run = jax.checkpoint(run) if remat else run
    for j in range(steps):
        if j == 0:
            parts, fresh = [], causal
        else:
            parts = [(earlier[0][0], earlier[0][1], causal)] + [(k, v, same) for k, v in earlier[1:]]
            fresh = same
        residual, k, v = run(_shift(input_ids, 1 + j), residual, base + j, parts, fresh)
        earlier.append(kv.cache_layout((k, v)))  # read as cached parts by the later steps
        outputs.append(residual)
    return jnp.stack(outputs)


def objective(draft, input_ids, loss_mask, lengths, features, last_hidden, *, steps: int, decay: float,
              remat: bool = False):
    """(loss, (parts, statistics)) of one micro-batch; statistics use the keys `trainer.summarize` reads."""
    B, S = input_ids.shape
    hidden = step_hidden(draft, features, input_ids, steps, remat=remat)
    t = jnp.arange(S)[None, :]

    def head(h, teacher_rows):
        """Per-position soft CE, soft acceptance and greedy agreement of one step (logits recomputed in backward)."""
        logits = draft.logits(h)
        teacher = jnp.take_along_axis(last_hidden, teacher_rows[:, :, None], axis=1).astype(h.dtype)
        # the cache holds the target's final-normed hidden states; the frozen head is the target's LM head
        p_t = jax.nn.softmax(jnp.einsum("bsd,vd->bsv", teacher, draft.lm_head[...], preferred_element_type=jnp.float32), axis=-1)
        logp_d = jax.nn.log_softmax(logits, axis=-1)
        ce = -jnp.sum(p_t * logp_d, axis=-1)
        alpha = jnp.sum(jnp.minimum(jnp.exp(logp_d), p_t), axis=-1)
        match = jnp.argmax(logits, axis=-1) == jnp.argmax(p_t, axis=-1)
        return ce, alpha, match

    head = jax.checkpoint(head)
    loss = 0.0
    valid, alpha_j, match_j = [], [], []
    for j in range(steps):
        target_pos = t + 2 + j
        ok = (target_pos < lengths[:, None]) & (jnp.take_along_axis(loss_mask, jnp.minimum(target_pos, S - 1), axis=1) > 0)
        rows = jnp.broadcast_to(jnp.minimum(t + 1 + j, S - 1), (B, S))
        ce, alpha, match = head(hidden[j], rows)
        w = ok.astype(jnp.float32)
        loss = loss + (decay**j) * jnp.sum(w * ce) / (jnp.sum(w) + 1e-6)
        valid.append(ok)
        alpha_j.append(alpha)
        match_j.append(match)
    valid, alpha, match = jnp.stack(valid), jnp.stack(alpha_j), jnp.stack(match_j)  # [steps, B, S]
    w = valid.astype(jnp.float32)
    reach = jnp.cumprod(w, axis=0)  # a chain's supervision stops at its first unsupervised target
    base = reach[0]
    stats = {  # expected (soft) and teacher-forced greedy acceptance lengths per chain, like trainer.summarize reads
        "slots": jnp.sum(w, axis=(1, 2)),
        "accept_sum": jnp.sum(w * alpha, axis=(1, 2)),
        "blocks": jnp.sum(base),
        "tau_prob_sum": jnp.sum(base + jnp.sum(jnp.cumprod(alpha * reach, axis=0), axis=0)),
        "tau_greedy_sum": jnp.sum(base + jnp.sum(jnp.cumprod(match * reach, axis=0), axis=0)),
    }
    return loss, ({"ce": loss}, stats)


def draft_config_from_recipe(target_config, spec):
    """The EAGLE-3 config a recipe's `draft` section describes, for `target_config` (its geometry)."""
    import dataclasses

    from dspark_jax.proposers.eagle3 import draft_config_for

    cfg = draft_config_for(target_config, target_layer_ids=tuple(spec.target_layer_ids), draft_length=int(spec.ttt_length),
                           step_loss_decay=float(spec.step_loss_decay))
    if spec.intermediate_size:
        cfg = dataclasses.replace(cfg, layer=dataclasses.replace(cfg.layer, intermediate_size=int(spec.intermediate_size)))
    return cfg


def init_from_target(target, config, *, seed: int = 0, dtype="float32"):
    """Fresh EAGLE-3 weights (N(0, 0.02), norms 1) with `embed_tokens` / `lm_head` copied from `target`
    (docs/eagle3.md §1.1); the feature layers must be interior layers of the target."""
    from flax import nnx

    from dspark_jax.handles import Draft
    from dspark_jax.layers.params import Init
    from dspark_jax.proposers.eagle3 import Eagle3Draft

    if config.reduced_vocab:
        raise ValueError("training a reduced-vocabulary EAGLE-3 draft is not supported")
    module = Eagle3Draft(config, Init(nnx.Rngs(seed), jnp.dtype(dtype)))
    module.check_target(target.config)
    t = target.module
    head = t.embed_tokens[...] if target.config.tie_word_embeddings else t.lm_head[...]
    module.embed_tokens.set_value(jnp.asarray(t.embed_tokens[...], dtype))
    module.lm_head.set_value(jnp.asarray(head, dtype))
    graphdef, params = nnx.split(module)
    return Draft(config=config, graphdef=graphdef, params=params, dtype=jnp.dtype(dtype))
