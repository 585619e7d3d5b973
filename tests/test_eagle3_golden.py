"""EAGLE-3 golden case: outputs of the PyTorch reference's `Qwen3Eagle3Model` and its decoding loop
(tests/data/golden/eagle3_qwen3/README.md, which defines the semantics and the tolerance).

Integers (tokens, positions, acceptance lengths) must match exactly; floats per tensor within
3e-5 * max(1, max |reference|).
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

ROOT = Path(__file__).parent / "data" / "golden" / "eagle3_qwen3"


def close(ours, ref, what):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    tol = 3e-5 * max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max())
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


@pytest.fixture(scope="module")
def case():
    ref = load_file(ROOT / "reference.safetensors")
    meta = json.loads((ROOT / "reference.json").read_text())
    draft = dj.load_draft(ROOT / "draft", dtype="float32")
    target = dj.load_target(ROOT / "target", dtype="float32")
    return ref, meta, draft, target


def test_checkpoint_and_pair(case):
    _, _, draft, target = case
    cfg = draft.config
    assert cfg.target_layer_ids == (1, 2, 4, 5, 6) and cfg.draft_length == 7 and not cfg.reduced_vocab
    assert draft.module.feature_indices == (2, 3, 5, 6, 7)  # README §2: hidden-state index l + 1
    dj.check_pair(target, draft)


def test_target_features(case):
    ref, _, draft, target = case
    ids = jnp.asarray(ref["features.token_ids"], jnp.int32)[None]
    model = target.module
    L, H = target.config.num_layers, target.config.hidden_size
    capture = tuple(range(L + 1)) + draft.module.feature_indices
    hidden, _, feats = model(ids, jnp.zeros(1, jnp.int32), model.init_cache(1, ids.shape[1]), capture=capture)
    feats = np.asarray(feats[0])
    close(feats[:, : (L + 1) * H].reshape(-1, L + 1, H).transpose(1, 0, 2), ref["features.hidden_states"], "hidden states")
    close(feats[:, (L + 1) * H :], ref["features.context_features"], "context features")
    close(model.logits(hidden)[0], ref["features.target_logits"], "target logits")


def test_forced_schedule(case):
    """The draft alone over the forced schedule (README §4): context entries, chaining, RoPE positions and the
    cache across rounds. Each round's verified rows are given to `extend` the way the engine does (K + 1 rows
    written ahead at the anchor); the forced acceptance decides how many are committed."""
    ref, meta, draft, _ = case
    module = draft.module
    K = draft.config.draft_length
    starts = ref["schedule.start"].astype(np.int32)
    S = np.asarray(ref["schedule.token_ids"], np.int64)
    F = np.asarray(ref["schedule.context_features"])
    T = len(S)
    pad = lambda a, n: np.concatenate([a, np.zeros((n - len(a),) + a.shape[1:], a.dtype)]) if len(a) < n else a
    P = int(meta["schedule"]["prefill_length"])
    assert P == int(starts[0])
    close(module.project(jnp.asarray(F)[None])[0, : len(ref["schedule.projected_features"])],
          ref["schedule.projected_features"], "projected features")
    state = module.init_state(1, T + K + 1)
    state = module.extend(state, jnp.asarray(S[None, :P], jnp.int32), jnp.asarray(F[None, :P]), jnp.zeros(1, jnp.int32))
    greedy = SamplingParams.create(1)
    keys = jax.random.split(jax.random.key(0), 1)
    for r, start in enumerate(starts):
        rnd = meta["schedule"]["rounds"][r]
        assert rnd["start"] == start == rnd["draft_cache_length_before"]
        assert int(ref["schedule.anchor"][r]) == int(S[start])
        lengths = jnp.asarray([start], jnp.int32)
        # one entry more than a round drafts, for the output of the last drafted entry (README §4 `last_step_hidden`)
        chain = module.sample_chain(state, jnp.asarray([S[start]], jnp.int32), lengths, greedy, keys, K + 1)
        close(chain.hidden[0, :K], ref["schedule.draft_hidden"][r], f"round {r} draft hidden")
        close(chain.hidden[0, K], ref["schedule.last_step_hidden"][r], f"round {r} last step hidden")
        close(chain.attn_input[0, 1:], ref["schedule.attn_input"][r], f"round {r} attention input")
        close(chain.attn_output[0, 1:], ref["schedule.attn_output"][r], f"round {r} attention output")
        close(chain.mlp_output[0, 1:], ref["schedule.mlp_output"][r], f"round {r} mlp output")
        close(chain.logits[0, :K], ref["schedule.draft_logits"][r], f"round {r} draft logits")
        drafts = np.asarray(chain.tokens[0, :K]).tolist()
        assert drafts == ref["schedule.draft_tokens"][r].tolist() == rnd["draft_tokens"], f"round {r} drafts"
        # the engine's proposal is the same chain
        proposal = module.propose(state, jnp.asarray([S[start]], jnp.int32), lengths, greedy, keys, K)
        assert np.asarray(proposal.tokens[0]).tolist() == drafts and int(proposal.num_proposed[0]) == K
        if r + 1 < len(starts):
            rows = slice(start, start + K + 1)
            state = module.extend(state, jnp.asarray(pad(S[rows], K + 1)[None], jnp.int32), jnp.asarray(pad(F[rows], K + 1)[None]), lengths)
            assert int(ref["schedule.ctx_start"][r + 1]) == start
            assert meta["schedule"]["rounds"][r + 1]["new_context_positions"] == [int(start), int(starts[r + 1])]


def _expected_proposals(sample, K):
    """The reference's proposal lengths, except rounds where its draft drafted a stop token and the target
    rejected it: the reference stops drafting there (README §3 step 3.2), the engine's proposers always send K
    drafts (docs/eagle3.md §6)."""
    out = []
    for rnd, n in zip(sample["rounds"], sample["proposal_lengths"]):
        stopped_early = len(rnd["draft_tokens"]) < K and not rnd["terminated_by_stop_token"]
        out.append(K if stopped_early else n)
    return out


@pytest.mark.parametrize("run_index", [0, 1])
def test_end_to_end_greedy(case, run_index):
    """The reference's decoding loop (README §3, §5): outputs, per-round acceptance, metrics."""
    _, meta, draft, target = case
    run = meta["e2e"][run_index]
    K = run["max_proposal_tokens"]
    samples = run["samples"]
    result = dj.generate(target, draft, [s["prompt"] for s in samples], max_new_tokens=run["max_new_tokens"],
                         temperature=run["temperature"], stop_token_ids=run["stop_token_ids"] or [], draft_length=K,
                         schedule="fixed")  # the reference's rounds
    stats = result.stats
    proposals = []
    for i, s in enumerate(samples):
        assert result.tokens[i] == s["output_ids"][s["prompt_length"] :], f"{run['name']} sample {i} output"
        assert stats.acceptance_lengths[i] == s["acceptance_lengths"], f"{run['name']} sample {i} acceptance"
        assert stats.accepted_draft_lengths[i] == s["accepted_draft_lengths"], f"{run['name']} sample {i} accepted"
        expected = _expected_proposals(s, K)
        if not run["stop_token_ids"]:
            assert expected == s["proposal_lengths"]
        assert stats.proposal_lengths[i] == expected, f"{run['name']} sample {i} proposals"
        proposals.append(expected)
        if run["stop_token_ids"]:
            assert s["output_ids"] == s["plain_greedy_with_stop_output_ids"]
    m = run["metrics"]
    assert stats.mean_acceptance_length == pytest.approx(m["acceptance_length"], abs=1e-12)  # tau counts the bonus
    acc = [x for s in samples for x in s["acceptance_lengths"]]
    a_all = [x for s in samples for x in s["accepted_draft_lengths"]]
    n_all = [x for p in proposals for x in p]
    assert stats.draft_tokens_per_proposal == pytest.approx(sum(n_all) / len(n_all), abs=1e-12)
    assert stats.verify_rate == pytest.approx(sum(acc) / (sum(n_all) + len(acc)), abs=1e-12)
    for i, ours in enumerate(stats.prefix_survival):
        proposed = sum(n > i for n in n_all)
        assert ours == pytest.approx(sum(a > i for a in a_all) / proposed, abs=1e-12)
    if not run["stop_token_ids"]:
        assert stats.draft_tokens_per_proposal == pytest.approx(m["draft_tokens_per_proposal"], abs=1e-12)
        assert stats.verify_rate == pytest.approx(m["verify_rate"], abs=1e-12)
        for ours, theirs in zip(stats.prefix_survival, m["accept_rates_by_position"]):
            assert ours == pytest.approx(theirs, abs=1e-12)


def test_plain_greedy(case):
    _, meta, _, target = case
    plain = dj.generate(target, None, [p["prompt"] for p in meta["plain_greedy"]],
                        max_new_tokens=meta["e2e"][0]["max_new_tokens"], stop_token_ids=[])
    for i, p in enumerate(meta["plain_greedy"]):
        assert plain.tokens[i] == p["output_ids"][len(p["prompt"]) :], f"plain greedy sample {i}"
