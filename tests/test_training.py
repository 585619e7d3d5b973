"""Draft training: loss formulas, anchors and block targets, the training forward against the PyTorch
reference's golden outputs, frozen embeddings, loss decrease, exact resume, export and the target cache."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import dspark_jax as dj
from converters.safetensors_io import SafetensorsFile
from dspark_jax.config import RopeConfig
from dspark_jax.handles import Target
from dspark_jax.models.qwen3 import Qwen3Config
from dspark_jax.proposers.dspark_checkpoint import export_draft
from dspark_jax.training import losses
from dspark_jax.training import target_cache as tc
from dspark_jax.training.anchors import block_targets, sample_anchors
from dspark_jax.training.forward import block_hidden_train
from dspark_jax.training.recipe import parse_recipe
from dspark_jax.training.trainer import DraftTrainer

HERE = Path(__file__).parent
GOLDEN = next((p for p in (HERE / "data" / "golden", Path("/work/shared/golden")) if p.is_dir()), None)
needs_golden = pytest.mark.skipif(GOLDEN is None, reason="golden reference data not available")


# --- loss formulas on hand-checkable inputs -----------------------------------------------------------------


def test_slot_terms_match_reference_formulas():
    p_draft = np.array([0.5, 0.3, 0.2])
    p_target = np.array([0.2, 0.3, 0.5])
    terms = losses.slot_terms(jnp.log(p_draft)[None], jnp.log(p_target)[None], jnp.array([0]), jnp.array([0.0]))
    # L1 = |0.5-0.2| + 0 + |0.2-0.5| = 0.6 (full L1, not TV); label = 1 - 0.6 / 2 = 0.7.
    np.testing.assert_allclose(terms["l1"], [0.6], rtol=1e-6)
    np.testing.assert_allclose(terms["accept"], [0.7], rtol=1e-6)
    np.testing.assert_allclose(terms["ce"], [-math.log(0.5)], rtol=1e-6)
    # BCE with logits at logit 0: -(0.7 log 0.5 + 0.3 log 0.5) = log 2.
    np.testing.assert_allclose(terms["conf"], [math.log(2)], rtol=1e-6)
    # Disjoint supports: L1 = 2, the label clips to 0.
    far = losses.slot_terms(jnp.array([[10.0, -10.0]]), jnp.array([[-10.0, 10.0]]), jnp.array([1]), jnp.array([2.0]))
    assert float(far["accept"][0]) == pytest.approx(0.0, abs=1e-7)
    np.testing.assert_allclose(far["conf"], [math.log1p(math.exp(2.0))], rtol=1e-6)


def test_position_weights_and_normalisation():
    sup = jnp.array([[True] * 7, [True, True, False, False, False, False, False]])
    w = losses.position_weights(sup, 4.0)
    np.testing.assert_allclose(w[0], [1, 0.7788, 0.6065, 0.4724, 0.3679, 0.2865, 0.2231], atol=1e-4)
    assert float(jnp.sum(w[1, 2:])) == 0.0
    terms = {"ce": jnp.full((2, 7), 2.0), "l1": jnp.ones((2, 7)), "conf": jnp.zeros((2, 7))}
    loss, parts = losses.combine(terms, sup, losses.LossWeights())
    D = float(jnp.sum(w))
    assert float(parts["ce"]) == pytest.approx(2.0 * D / (D + 1e-6), rel=1e-6)
    assert float(loss) == pytest.approx((0.1 * 2.0 + 0.9 * 1.0) * D / (D + 1e-6), rel=1e-6)
    dflash, _ = losses.combine({"ce": terms["ce"], "l1": terms["l1"]}, sup, losses.LossWeights(ce=1.0, l1=0.0, conf=0.0))
    assert float(dflash) == pytest.approx(2.0 * D / (D + 1e-6), rel=1e-6)


def test_confidence_label_is_detached():
    """The BCE term's gradient reaches the confidence logit but not the draft logits through the label."""
    z = jnp.array([[0.3, -0.2, 0.5]])
    ut = jnp.array([[0.1, 0.4, -0.3]])

    def conf_loss(z, c):
        return losses.slot_terms(z, ut, jnp.array([1]), c)["conf"].sum()

    gz, gc = jax.grad(conf_loss, argnums=(0, 1))(z, jnp.array([0.4]))
    assert float(jnp.max(jnp.abs(gz))) == 0.0
    label = float(losses.slot_terms(z, ut, jnp.array([1]), None)["accept"][0])
    assert float(gc[0]) == pytest.approx(float(jax.nn.sigmoid(0.4)) - label, rel=1e-5)


# --- anchors and block targets ------------------------------------------------------------------------------


def test_anchor_sampling_rules():
    S = 40
    loss_mask = np.zeros((3, S), np.uint8)
    loss_mask[0, 10:30] = 1  # candidates 10..28 (the last supervised position has no supervised successor)
    loss_mask[1, 5:9] = 1  # candidates 5..7: fewer than N -> dummies
    loss_mask[2, 30:40] = 1  # length 35 -> candidates 30..33
    lengths = np.array([40, 40, 35], np.int32)
    sample = jax.jit(sample_anchors, static_argnums=3)
    anchors, keep = sample(jax.random.key(0), jnp.asarray(loss_mask), jnp.asarray(lengths), 8)
    anchors, keep = np.asarray(anchors), np.asarray(keep)
    assert keep[0].all() and set(anchors[0]) <= set(range(10, 29)) and len(set(anchors[0])) == 8
    assert np.all(np.diff(anchors[0]) > 0)
    assert list(anchors[1][keep[1]]) == [5, 6, 7] and not keep[1, 3:].any() and (anchors[1, 3:] == 0).all()
    assert list(anchors[2][keep[2]]) == [30, 31, 32, 33]
    # Uniform: over many draws every candidate of row 0 is chosen about 8/19 of the time.
    counts = np.zeros(S)
    for seed in range(200):
        a, _ = sample(jax.random.key(seed), jnp.asarray(loss_mask[:1]), jnp.asarray(lengths[:1]), 8)
        counts[np.asarray(a[0])] += 1
    freq = counts[10:29] / 200
    assert np.all(np.abs(freq - 8 / 19) < 0.15), freq


def test_block_targets_by_hand():
    ids = jnp.arange(100, 112, dtype=jnp.int32)[None]  # token at position p is 100 + p
    loss_mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1, 0, 1, 1, 0]], jnp.uint8)
    lengths = jnp.array([12])
    anchors = jnp.array([[3, 9, 0]])
    keep = jnp.array([[True, True, False]])
    t = block_targets(ids, loss_mask, lengths, anchors, keep, 4, 99)
    assert t.block_ids.tolist() == [[[103, 99, 99, 99], [109, 99, 99, 99], [99, 99, 99, 99]]]
    assert t.positions[0, 0].tolist() == [3, 4, 5, 6]
    # Block at 3: labels 4..7 all supervised. Block at 9: label 10 supervised, 11 not, 12+ outside -> cut.
    assert t.target_ids[0, 0].tolist() == [104, 105, 106, 107]
    assert t.supervised.tolist() == [[[True] * 4, [True, False, False, False], [False] * 4]]
    assert t.target_ids[0, 1].tolist() == [110, 111, 111, 111]  # clamped to the last position
    assert t.prev_ids[0, 0].tolist() == [103, 104, 105, 106]
    assert t.teacher_rows[0, 0].tolist() == [3, 4, 5, 6]  # row t of the last hidden predicts token t + 1


# --- the training forward against the reference ---------------------------------------------------------------


def _golden(case):
    from converters.safetensors_io import SafetensorsFile

    ref = SafetensorsFile(GOLDEN / case / "reference.safetensors")
    return {k: np.asarray(ref.get(k)) for k in ref.keys()}


@needs_golden
@pytest.mark.parametrize("case", ["dspark_qwen3_vanilla", "dspark_gemma4_vanilla", "dflash_qwen3"])
def test_training_forward_matches_reference_rounds(case):
    """All forced rounds of the golden schedule as anchors of ONE training forward: block hidden states, base
    and corrected logits and confidence logits equal the reference's round-by-round inference values."""
    ref = _golden(case)
    draft = dj.load_draft(GOLDEN / case / "draft", dtype="float32")
    module = draft.module
    starts = ref["schedule.start"].astype(np.int32)
    R = len(starts)
    tokens = ref["schedule.token_ids"].astype(np.int32)
    S = int(starts.max()) + 1  # the context after the last anchor is never visible to it
    features = jnp.asarray(ref["schedule.context_features"][None, :S])
    block_ids = jnp.asarray(ref["schedule.block_input_ids"][None].astype(np.int32))
    positions = jnp.asarray(starts[None, :, None] + np.arange(draft.config.block_size)[None, None, :])
    # A dummy block (anchor 0, nothing visible) between real ones must not disturb them.
    block_ids = jnp.concatenate([block_ids[:, :1], jnp.full_like(block_ids[:, :1], draft.config.mask_token_id), block_ids[:, 1:]], 1)
    positions = jnp.concatenate([positions[:, :1], jnp.zeros_like(positions[:, :1]), positions[:, 1:]], 1)
    keep = jnp.asarray([[True, False] + [True] * (R - 1)])
    forward = jax.jit(lambda params, *args: block_hidden_train(nnx.merge(draft.graphdef, params), *args))
    hidden = forward(draft.params, features, block_ids, positions, keep)
    assert bool(jnp.all(jnp.isfinite(hidden))) and float(jnp.max(jnp.abs(hidden[0, 1]))) == 0.0
    hidden = jnp.concatenate([hidden[:, :1], hidden[:, 2:]], axis=1)[0]  # [R, K, D]

    def close(ours, theirs):
        theirs = np.asarray(theirs)
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=3e-5 * max(1.0, float(np.abs(theirs).max())), rtol=0)

    close(hidden, ref["schedule.block_hidden"])
    close(module.base_logits(hidden), ref["schedule.base_logits"])
    # Teacher forcing with the reference's own greedy tokens as previous tokens gives its corrected logits.
    drafts = ref["schedule.draft_tokens"].astype(np.int32)
    prev = jnp.asarray(np.concatenate([tokens[starts][:, None], drafts[:, :-1]], axis=1))
    corrected = module.base_logits(hidden)
    if module.markov_head is not None:
        corrected = corrected + module.markov_head.block_bias(prev, hidden)
    close(corrected, ref["schedule.corrected_logits"])
    if module.confidence_head is not None:
        close(module.confidence(hidden, prev), ref["schedule.confidence_logits"])


# --- a tiny target, its cache and short training runs ----------------------------------------------------------

TINY = Qwen3Config(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                   num_kv_heads=2, head_dim=8, rope=RopeConfig(theta=10000.0), tie_word_embeddings=True)


def _sequences(n, seed=0):
    """Sequences of a noisy counter (learnable), with a 4-token unsupervised prompt each."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        L = int(rng.integers(24, 56))
        start = int(rng.integers(0, 60))
        ids = (start + np.arange(L)) % 60
        noise = rng.random(L) < 0.1
        ids[noise] = rng.integers(0, 60, noise.sum())
        mask = np.ones(L, np.uint8)
        mask[:4] = 0
        out.append((ids.astype(np.int32), mask))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    target = Target.random(TINY, seed=3)
    train = tc.build_cache(target, _sequences(24), root / "train", target_layer_ids=[0, 1], hidden_dtype="float32", group=8)
    dev = tc.build_cache(target, _sequences(8, seed=1), root / "dev", target_layer_ids=[0, 1], hidden_dtype="float32", group=8)
    return target, root, train, dev


def _recipe(root, name, **over):
    base = dict(
        target=str(root / "no-target-dir"), train_cache=str(root / "train"), eval_cache=str(root / "dev"),
        output_dir=str(root / name),
        draft=dict(num_layers=1, block_size=4, target_layer_ids=[0, 1], mask_token_id=63, markov_rank=8,
                   confidence_head=True, num_anchors=8),
        batch_size=4, steps=8, max_length=64, length_buckets=[64], chunk_blocks=8, checkpoint_every=2,
        eval=dict(every=0, max_samples=8), optimizer=dict(lr=3e-3, warmup_ratio=0.1), export=dict(dtype="float32"),
    )
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return parse_recipe(base)


def _flat(state):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def test_training_lowers_loss_and_never_touches_the_embeddings(tiny):
    target, root, _, _ = tiny
    trainer = DraftTrainer(_recipe(root, "lower", steps=30, checkpoint_every=30), target=target)
    before = _flat(trainer.draft().params)
    # The copies are the target's tables (tied target: both are its embedding).
    np.testing.assert_array_equal(before[("backbone", "embed_tokens")], np.asarray(target.module.embed_tokens[...]))
    np.testing.assert_array_equal(before[("backbone", "lm_head")], np.asarray(target.module.embed_tokens[...]))
    records = trainer.train(progress=False)
    after = _flat(trainer.draft().params)
    first, last = np.mean([r["loss"] for r in records[:3]]), np.mean([r["loss"] for r in records[-3:]])
    assert last < 0.8 * first, (first, last)
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in records)
    for path in before:
        if tuple(path[:2]) in (("backbone", "embed_tokens"), ("backbone", "lm_head")):
            np.testing.assert_array_equal(after[path], before[path])  # frozen: bit-for-bit unchanged
        else:
            assert not np.array_equal(after[path], before[path]), f"{path} was not trained"
    assert records[-1]["eval"]["tau_prob"] > 1.0 and len(records[-1]["eval"]["accept_rate"]) == 4
    # Export -> load round-trips exactly (fp32), and bf16 export loads as the bf16 cast.
    out = trainer.export(root / "lower_fp32", dtype="float32")
    loaded = dj.load_draft(out, dtype="float32")
    assert loaded.config == trainer.config
    for path, value in _flat(loaded.params).items():
        np.testing.assert_array_equal(value, after[path])
    out16 = trainer.export(root / "lower_bf16", dtype="bfloat16")
    for path, value in _flat(dj.load_draft(out16, dtype="bfloat16").params).items():
        np.testing.assert_array_equal(value, after[path].astype(ml_dtypes.bfloat16))
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3DSparkModel"]


def test_resume_after_interruption_reproduces_the_run(tiny):
    """Kill after step 5 (last checkpoint: step 4), start a fresh trainer: the same losses as one uninterrupted run.
    The recipe is the DFlash variant, so this also checks that its objective is cross-entropy only."""
    target, root, _, _ = tiny
    dflash = dict(draft=dict(markov_rank=0, confidence_head=False), loss=dict(ce=1.0, l1=0.0, conf=0.0), eval_cache=None)
    full_trainer = DraftTrainer(_recipe(root, "full", **dflash), target=target)
    full = full_trainer.train(progress=False)
    first = DraftTrainer(_recipe(root, "killed", **dflash), target=target).train(stop_after=5, progress=False)
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5]
    resumed_trainer = DraftTrainer(_recipe(root, "killed", **dflash), target=target)
    module = resumed_trainer.draft().module
    assert module.markov_head is None and module.confidence_head is None
    resumed = resumed_trainer.train(progress=False)
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[4:]]
    assert [r["loss"] for r in first] == [r["loss"] for r in full[:5]]
    assert all("conf" not in r and r["loss"] == pytest.approx(r["ce"], rel=1e-6) for r in full)
    for x, y in zip(jax.tree.leaves(resumed_trainer.trainable), jax.tree.leaves(full_trainer.trainable), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_chunked_loss_equals_unchunked(tiny):
    """Chunking the vocabulary-sized work over blocks changes nothing: same per-slot terms and gradients."""
    from dspark_jax.training.init import init_from_target

    target, _, _, _ = tiny
    draft = init_from_target(target, _recipe_config_dspark(), seed=1)
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((2, 5, 4, 32)), jnp.float32)
    teacher = jnp.asarray(rng.standard_normal((2, 5, 4, 32)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 64, (2, 5, 4)), jnp.int32)
    sup = jnp.asarray(rng.random((2, 5, 4)) < 0.8)

    @functools.partial(jax.jit, static_argnums=0)
    def grads(chunk, params, hidden):
        def f(params, hidden):
            module = nnx.merge(draft.graphdef, params)
            terms = losses.block_terms(module, hidden, teacher, ids, ids, chunk)
            return losses.combine(terms, sup, losses.LossWeights())[0]
        return jax.grad(f, argnums=(0, 1))(params, hidden)

    a, b = jax.tree.leaves(grads(10, draft.params, hidden)), jax.tree.leaves(grads(3, draft.params, hidden))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


# --- export of golden checkpoints, and the cache format ---------------------------------------------------------


@needs_golden
@pytest.mark.parametrize("case", ["dspark_qwen3_vanilla", "dspark_gemma4_vanilla", "dflash_qwen3"])
def test_export_reproduces_reference_checkpoint(case, tmp_path):
    src = GOLDEN / case / "draft"
    draft = dj.load_draft(src, dtype="float32")
    out = export_draft(draft, tmp_path / case, dtype="float32", base_config=json.loads((src / "config.json").read_text()))
    a, b = SafetensorsFile(src / "model.safetensors"), SafetensorsFile(out / "model.safetensors")
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
        assert a.get(key).dtype == b.get(key).dtype and np.array_equal(a.get(key), b.get(key)), key
    assert dj.load_draft(out, dtype="float32").config == draft.config


def test_cache_round_trip_and_resume(tiny, tmp_path):
    target, _, train, _ = tiny
    samples = _sequences(24)
    assert len(train) == 24 and train.manifest["target_layer_ids"] == [0, 1] and train.manifest["num_samples"] == 24
    # Stored features are the target's own: a direct forward gives the same rows.
    ids, mask = samples[5]
    _, _, feats = target.module(jnp.asarray(ids)[None], jnp.zeros((1,), jnp.int32), target.module.init_cache(1, len(ids)),
                                capture=(1, 2))
    hidden, _, _ = target.module(jnp.asarray(ids)[None], jnp.zeros((1,), jnp.int32), target.module.init_cache(1, len(ids)))
    stored = [s for s in (train[i] for i in range(len(train))) if np.array_equal(s.input_ids, ids)][0]
    np.testing.assert_array_equal(stored.loss_mask, mask)
    np.testing.assert_allclose(stored.features, np.asarray(feats[0]), atol=2e-6)
    np.testing.assert_allclose(stored.last_hidden, np.asarray(hidden[0]), atol=2e-6)

    class Interrupted(Exception):
        pass

    def dying():
        for i, s in enumerate(samples):
            if i == 19:
                raise Interrupted
            yield s

    with pytest.raises(Interrupted):
        tc.build_cache(target, dying(), tmp_path / "c", target_layer_ids=[0, 1], hidden_dtype="bfloat16", group=8)
    assert json.loads((tmp_path / "c" / "progress.json").read_text())["records_consumed"] == 16
    resumed = tc.build_cache(target, samples, tmp_path / "c", target_layer_ids=[0, 1], hidden_dtype="bfloat16", group=8)
    fresh = tc.build_cache(target, samples, tmp_path / "d", target_layer_ids=[0, 1], hidden_dtype="bfloat16", group=8)
    for name in ("samples.idx", "shard-00000.bin"):
        assert (tmp_path / "c" / name).read_bytes() == (tmp_path / "d" / name).read_bytes()
    assert len(resumed) == 24 and resumed[0].features.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(resumed[7].features, fresh[7].features)
    with pytest.raises(dj.ConfigError, match="rebuild the cache"):
        resumed.check_draft(dataclasses.replace(_recipe_config(), target_layer_ids=(0,)))


def _recipe_config():
    from dspark_jax.training.init import draft_config_from_target

    return draft_config_from_target(TINY, num_layers=1, target_layer_ids=[0, 1], mask_token_id=63)


def _recipe_config_dspark():
    from dspark_jax.training.init import draft_config_from_target

    return draft_config_from_target(TINY, num_layers=1, target_layer_ids=[0, 1], mask_token_id=63, block_size=4,
                                    markov_rank=8, confidence_head=True)


def test_loss_mask_covers_assistant_turns():
    from dspark_jax.tokenizer import Tokenizer
    from dspark_jax.training import bpe
    from dspark_jax.training.data import tokenize_record

    corpus = ["def add(a, b):\n    return a + b\n", "Write a function to add two numbers.", "hello world"] * 20
    tok = bpe.train_tokenizer(corpus, 300)

    class Wrapped(Tokenizer):
        pass

    t = Wrapped(tok, bpe.CHAT_TEMPLATE, {})
    conv = {"conversations": [{"role": "user", "content": "Write a function to add two numbers."},
                              {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
                              {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"}]}
    ids, mask = tokenize_record(t, conv, max_length=512)
    text = t.decode(ids, skip_special_tokens=False)
    supervised = "".join(t.decode([i], skip_special_tokens=False) for i, m in zip(ids, mask, strict=True) if m)
    assert supervised == "def add(a, b):\n    return a + b<|im_end|>\nhello world<|im_end|>\n"
    assert text.startswith("<|im_start|>user\n") and mask[0] == 0
    ids2, mask2 = tokenize_record(t, {"text": "hello world"}, max_length=2)
    assert len(ids2) == 2 and mask2.tolist() == [1, 1]


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_shipped_configs_parse(name):
    """Every recipe in configs/ is accepted by the strict parsers (an unknown key would fail the documented commands)."""
    import yaml

    from dspark_jax.tools.fixture import load_config
    from dspark_jax.training.recipe import load_recipe

    path = Path(__file__).parents[1] / "configs" / name
    if "drafts" in yaml.safe_load(path.read_text()):  # a fixture pipeline (build-fixture), not a training recipe
        cfg = load_config(path)
        for recipe in cfg.drafts.values():
            assert (Path(__file__).parents[1] / recipe).is_file(), recipe
    else:
        recipe = load_recipe(path)
        assert recipe.steps > 0 and recipe.draft.target_layer_ids


def test_fixture_text_windows_are_line_aligned_train_text_and_reproducible(tmp_path):
    """The fixture cache stage's plain-text windows (`cache.text_windows`): `text_chars` characters of a train
    source file, starting at a line, the same draw on every run; files too short for a window are never drawn."""
    from dspark_jax.tools.fixture import FixtureConfig, Pipeline

    root = tmp_path / "lib"
    root.mkdir()
    long_text = "".join(f"line {i}: {'x' * (i % 7)}\n" for i in range(400))
    (root / "a.py").write_text(long_text)
    (root / "short.py").write_text("tiny\n")
    out = tmp_path / "run"
    (out / "data").mkdir(parents=True)
    (out / "data" / "split.json").write_text(json.dumps({"stdlib_root": str(root), "train_files": ["a.py", "short.py"],
                                                          "heldout_files": [], "prompts": {}}))
    pipe = Pipeline(FixtureConfig(output_dir=str(out)))
    windows = pipe._text_windows(20, 300)
    assert len(windows) == 20 and windows == pipe._text_windows(20, 300)
    for w in windows:
        assert 0 < len(w) <= 300 and w in long_text
        start = long_text.index(w)
        assert start == 0 or long_text[start - 1] == "\n"
