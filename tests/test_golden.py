"""Every DSpark / DFlash case of the golden reference data (outputs of the PyTorch reference,
tests/data/golden/README.md). EAGLE-3 cases have their own semantics and test (tests/test_eagle3_golden.py).

Integers must match exactly; floats per tensor within 3e-5 * max(1, max |reference|).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import dspark_jax as dj
from dspark_jax.config import SamplingParams

GOLDEN = Path(__file__).parent / "data" / "golden"


def _dspark_case(folder: Path) -> bool:
    """A case whose draft is a DeepSpec DSpark / DFlash model (`Qwen3DSparkModel`, `Gemma4DSparkModel`)."""
    archs = json.loads((folder / "draft" / "config.json").read_text()).get("architectures") or [""]
    return archs[0].endswith("DSparkModel")


CASES = sorted(p.name for p in GOLDEN.iterdir() if p.is_dir() and _dspark_case(p))


def close(ours, ref, what):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    tol = 3e-5 * max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max())
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


@pytest.fixture(scope="module", params=CASES)
def case(request):
    root = GOLDEN / request.param
    ref = load_file(root / "reference.safetensors")
    meta = json.loads((root / "reference.json").read_text())
    draft = dj.load_draft(root / "draft", dtype="float32")
    target_dir = root / "target"
    if not target_dir.exists() and "dspark_qwen3_vanilla" in str(meta.get("target_source", "")):
        target_dir = GOLDEN / "dspark_qwen3_vanilla" / "target"  # shared, not duplicated (see its reference.json)
    target = dj.load_target(target_dir, dtype="float32") if target_dir.exists() else None
    return request.param, ref, meta, draft, target


def test_target_features(case):
    name, ref, meta, draft, target = case
    if target is None:
        pytest.skip(f"{name} has no target model")
    ids = jnp.asarray(ref["features.token_ids"], jnp.int32)[None]
    model = target.module
    L = target.config.num_layers
    capture = tuple(range(L + 1)) + draft.config.hidden_state_indices
    hidden, _, feats = model(ids, jnp.zeros(1, jnp.int32), model.init_cache(1, ids.shape[1]), capture=capture)
    H = target.config.hidden_size
    feats = np.asarray(feats[0])
    close(feats[:, : (L + 1) * H].reshape(-1, L + 1, H).transpose(1, 0, 2), ref["features.hidden_states"], "hidden states")
    close(feats[:, (L + 1) * H :], ref["features.context_features"], "context features")
    close(model.logits(hidden)[0], ref["features.target_logits"], "target logits")


def test_forced_schedule(case):
    """Draft alone over the forced multi-round schedule: cache handling, injection, RoPE, heads, Markov."""
    name, ref, meta, draft, _ = case
    module = draft.module
    bs = draft.config.block_size
    starts = ref["schedule.start"].astype(np.int32)
    features = jnp.asarray(ref["schedule.context_features"])[None]
    tokens = ref["schedule.token_ids"]
    cache = module.init_state(1, int(starts[-1]) + bs)
    greedy = SamplingParams.create(1)
    keys = jax.random.split(jax.random.key(0), 1)
    committed = 0
    for r, start in enumerate(starts):
        assert int(ref["schedule.ctx_start"][r]) == committed
        cache = module.extend(cache, None, features[:, committed:start], jnp.asarray([committed], jnp.int32))
        committed = int(start)
        anchor = jnp.asarray([tokens[start]], jnp.int32)
        assert int(ref["schedule.anchor"][r]) == int(tokens[start])
        lengths = jnp.asarray([start], jnp.int32)
        block = jnp.asarray(ref["schedule.block_input_ids"][r : r + 1], jnp.int32)
        hidden = module.block_hidden(block, lengths, cache)
        close(hidden[0], ref["schedule.block_hidden"][r], f"round {r} block hidden")
        close(module.base_logits(hidden)[0], ref["schedule.base_logits"][r], f"round {r} base logits")
        drafts, _, corrected, confidence = module.sample_block(cache, anchor, lengths, greedy, keys, bs)
        close(corrected[0], ref["schedule.corrected_logits"][r], f"round {r} corrected logits")
        if "schedule.confidence_logits" in ref:
            close(confidence[0], ref["schedule.confidence_logits"][r], f"round {r} confidence logits")
        else:
            assert module.confidence_head is None
        assert np.asarray(drafts[0]).tolist() == ref["schedule.draft_tokens"][r].tolist(), f"round {r} drafts"
        assert meta["schedule"]["rounds"][r]["draft_cache_length_after"] == committed


def test_end_to_end_greedy(case):
    """DeepSpec's decoding loop: outputs, per-round acceptance and proposal lengths, metrics."""
    name, ref, meta, draft, target = case
    if "e2e" not in meta:
        pytest.skip(f"{name} has no end-to-end runs")
    for run in meta["e2e"]:
        samples = run["samples"]
        result = dj.generate(
            target,
            draft,
            [s["prompt"] for s in samples],
            max_new_tokens=run["max_new_tokens"],
            temperature=run["temperature"],
            confidence_threshold=run["confidence_threshold"],
            stop_token_ids=run["stop_token_ids"] or [],
            draft_length=run["max_proposal_tokens"],
            schedule="fixed",  # the reference's rounds: whole blocks or the threshold prefix
        )
        stats = result.stats
        for i, s in enumerate(samples):
            assert result.tokens[i] == s["output_ids"][s["prompt_length"] :], f"{run['name']} sample {i} output"
            assert stats.acceptance_lengths[i] == s["acceptance_lengths"], f"{run['name']} sample {i} acceptance"
            assert stats.proposal_lengths[i] == s["proposal_lengths"], f"{run['name']} sample {i} proposals"
            assert stats.accepted_draft_lengths[i] == s["accepted_draft_lengths"], f"{run['name']} sample {i} accepted"
        m = run["metrics"]
        assert stats.mean_acceptance_length == pytest.approx(m["acceptance_length"], abs=1e-12)
        assert stats.draft_tokens_per_proposal == pytest.approx(m["draft_tokens_per_proposal"], abs=1e-12)
        assert stats.verify_rate == pytest.approx(m["verify_rate"], abs=1e-12)
        for ours, theirs in zip(stats.prefix_survival, m["accept_rates_by_position"]):
            assert (ours is None and theirs is None) or ours == pytest.approx(theirs, abs=1e-12)
    plain = dj.generate(target, None, [p["prompt"] for p in meta["plain_greedy"]], max_new_tokens=meta["e2e"][0]["max_new_tokens"], stop_token_ids=[])
    for i, p in enumerate(meta["plain_greedy"]):
        assert plain.tokens[i] == p["output_ids"][len(p["prompt"]) :], f"plain greedy sample {i}"
