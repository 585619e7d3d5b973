"""EAGLE-3 draft training (docs/eagle3.md §8): the training-time test computes what inference computes,
the loss goes down with the embeddings frozen, kill -> resume reproduces the run, export -> load round-trips."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from test_training import _flat, _sequences

import dspark_jax as dj
from dspark_jax.config import RopeConfig, SamplingParams
from dspark_jax.models.qwen3 import Qwen3Config
from dspark_jax.testing import synthetic
from dspark_jax.training import eagle3
from dspark_jax.training import target_cache as tc
from dspark_jax.training.recipe import parse_recipe
from dspark_jax.training.trainer import DraftTrainer

TINY6 = Qwen3Config(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=6, num_heads=4,
                    num_kv_heads=2, head_dim=8, rope=RopeConfig(theta=10000.0), tie_word_embeddings=True)
IDS = [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_eagle3")
    # a target with peaked next-token distributions (its greedy next token repeats the current one), so the
    # draft has something to learn from the teacher distributions
    target = synthetic.bigram_target(TINY6, seed=3)
    tc.build_cache(target, _sequences(24), root / "train", target_layer_ids=IDS, hidden_dtype="float32", group=8)
    tc.build_cache(target, _sequences(8, seed=1), root / "dev", target_layer_ids=IDS, hidden_dtype="float32", group=8)
    return target, root


def _recipe(root, name, **over):
    base = dict(
        target=str(root / "no-target-dir"), train_cache=str(root / "train"), eval_cache=str(root / "dev"),
        output_dir=str(root / name), draft=dict(kind="eagle3", target_layer_ids=IDS, ttt_length=4, step_loss_decay=0.8),
        batch_size=4, steps=8, max_length=64, length_buckets=[64], checkpoint_every=2,
        eval=dict(every=0, max_samples=8), optimizer=dict(lr=3e-3, warmup_ratio=0.1), export=dict(dtype="float32"),
    )
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return parse_recipe(base)


def test_training_time_test_is_the_inference_chain(tiny):
    """Step j of the training forward at base position t equals entry j of an inference chain anchored at t + 1
    over the committed context [0, t + 1), fed the same (ground-truth) tokens."""
    target, _ = tiny
    cfg = eagle3.draft_config_from_recipe(TINY6, _recipe(tiny[1], "x").draft)
    draft = eagle3.init_from_target(target, cfg, seed=5)
    params = jax.tree.map(lambda x: x * 8.0 if x.ndim > 1 else x, draft.params)  # larger than init: non-trivial attention
    module = nnx.merge(draft.graphdef, params)
    rng = np.random.default_rng(0)
    S, steps = 20, 4
    ids = jnp.asarray(rng.integers(0, 64, (1, S)), jnp.int32)
    features = jnp.asarray(rng.standard_normal((1, S, 5 * 32)), jnp.float32)
    hidden = eagle3.step_hidden(module, features, ids, steps)  # [steps, 1, S, D]
    greedy, keys = SamplingParams.create(1), jax.random.split(jax.random.key(0), 1)
    for t in (0, 3, 9, 14):
        state = module.extend(module.init_state(1, S + steps + 2), ids[:, : t + 1], features[:, : t + 1], jnp.zeros(1, jnp.int32))
        forced = ids[:, t + 2 : t + 2 + steps]
        forced = jnp.pad(forced, ((0, 0), (0, steps - forced.shape[1])))
        chain = module.sample_chain(state, ids[:, t + 1], jnp.asarray([t + 1], jnp.int32), greedy, keys, steps, forced=forced)
        for j in range(steps):
            if t + 1 + j < S:  # the training forward feeds zeros past the end of the sequence
                np.testing.assert_allclose(np.asarray(chain.hidden[0, j]), np.asarray(hidden[j, 0, t]), rtol=2e-5, atol=2e-5,
                                           err_msg=f"t={t} step {j}")


def test_training_lowers_loss_keeps_embeddings_and_exports(tiny):
    target, root = tiny
    trainer = DraftTrainer(_recipe(root, "lower", steps=30, checkpoint_every=30), target=target)
    before = _flat(trainer.draft().params)
    np.testing.assert_array_equal(before[("embed_tokens",)], np.asarray(target.module.embed_tokens[...]))
    np.testing.assert_array_equal(before[("lm_head",)], np.asarray(target.module.embed_tokens[...]))
    records = trainer.train(progress=False)
    after = _flat(trainer.draft().params)
    first, last = np.mean([r["loss"] for r in records[:3]]), np.mean([r["loss"] for r in records[-3:]])
    assert last < 0.8 * first, (first, last)
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in records)
    for path in before:
        if path in (("embed_tokens",), ("lm_head",)):
            np.testing.assert_array_equal(after[path], before[path])
        else:
            assert not np.array_equal(after[path], before[path]), f"{path} was not trained"
    ev = records[-1]["eval"]
    assert ev["tau_prob"] > 1.0 and len(ev["accept_rate"]) == 4 and ev["tau_greedy_tf"] >= 1.0
    out = trainer.export(root / "lower_fp32", dtype="float32")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3Eagle3Model"]
    loaded = dj.load_draft(out, dtype="float32")
    assert loaded.config.target_layer_ids == tuple(IDS) and loaded.config.draft_length == 4
    assert loaded.config.step_loss_decay == 0.8
    for path, value in _flat(loaded.params).items():
        np.testing.assert_array_equal(value, after[path])
    out16 = trainer.export(root / "lower_bf16", dtype="bfloat16")
    for path, value in _flat(dj.load_draft(out16, dtype="bfloat16").params).items():
        np.testing.assert_array_equal(value, after[path].astype(ml_dtypes.bfloat16))
    # the trained draft decodes losslessly
    prompts = [[1, 2, 3, 4], [10, 11]]
    plain = dj.generate(target, None, prompts, max_new_tokens=12, stop_token_ids=[]).tokens
    assert dj.generate(target, loaded, prompts, max_new_tokens=12, stop_token_ids=[]).tokens == plain


@pytest.mark.slow
def test_resume_after_interruption_reproduces_the_run(tiny):
    target, root = tiny
    full_trainer = DraftTrainer(_recipe(root, "full", eval_cache=None), target=target)
    full = full_trainer.train(progress=False)
    first = DraftTrainer(_recipe(root, "killed", eval_cache=None), target=target).train(stop_after=5, progress=False)
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5]
    resumed_trainer = DraftTrainer(_recipe(root, "killed", eval_cache=None), target=target)
    resumed = resumed_trainer.train(progress=False)
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[4:]]
    assert [r["loss"] for r in first] == [r["loss"] for r in full[:5]]
    for x, y in zip(jax.tree.leaves(resumed_trainer.trainable), jax.tree.leaves(full_trainer.trainable), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_recipe_refusals(tiny):
    from dspark_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="kind"):
        _recipe(tiny[1], "bad", draft=dict(kind="medusa"))
    with pytest.raises(ConfigError, match="num_layers 1"):
        _recipe(tiny[1], "bad", draft=dict(num_layers=2))
