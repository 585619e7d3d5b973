"""The DeepSeek-V4 MTP module (`mtp.0`) as a proposer.

transformers does not run V4's MTP module (it skips `mtp.*`), so the reference is the official `MTPBlock`
formula (docs/deepseek.md §10) assembled from transformers' own V4 modules (`deepseek_v4_models.MTPReference`),
randomised and written into a hub-layout checkpoint next to a random target.

* Loading: `dj.load_draft(<target checkpoint>)` reads `mtp.0.*` plus the shared embedding and head.
* Numerics: after a ragged prefill and verify rounds with rejected suffixes, the drafted distributions of
  chained MTP-3 equal the reference block run without a cache over the committed rows (step j feeding the
  previous step's output streams and drafted token).
* Losslessness (slow): greedy speculative decoding with the loaded, oracle and mixed MTP drafts equals plain
  greedy decoding; sampled speculative decoding with the MTP draft matches the exact target distribution.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from deepseek_v4_models import MTPReference, build, hub_copy
from flax import nnx

import dspark_jax as dj
from dspark_jax.config import SamplingParams
from dspark_jax.engine import sampling
from dspark_jax.errors import CheckpointError, ConfigError
from dspark_jax.proposers.mtp_v4 import V4MTPProposer

TOL = 1e-6  # on probabilities (vocabulary 64)
ONE_LAYER = dict(num_hidden_layers=2, layer_types=["sliding_attention", "compressed_sparse_attention"],
                 mlp_layer_types=["hash_moe", "moe"])


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("v4_mtp")
    hf = build(root / "hf", seed=4, **ONE_LAYER)
    hub_copy(root / "hf", root / "hub", hf)
    ref = MTPReference(hf, seed=40)
    tensors = load_file(root / "hub" / "model.safetensors")
    tensors.update(ref.hub_tensors())
    save_file(tensors, root / "hub" / "model.safetensors", metadata={"format": "pt"})
    return dict(dir=root / "hub", hf=hf, ref=ref, target=dj.load_target(root / "hub", dtype="float32"),
                draft=dj.load_draft(root / "hub", dtype="float32"))


def test_load_draft_reads_mtp_0_and_the_shared_embedding_and_head(case):
    draft, target, ref = case["draft"], case["target"], case["ref"]
    assert isinstance(draft.module, V4MTPProposer)
    dj.check_pair(target, draft)
    assert draft.module.feature_indices == (target.config.num_layers + 1,)
    flat = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(draft.params)}
    np.testing.assert_array_equal(flat[("e_proj",)], ref.e_proj.weight.detach().numpy().T)
    np.testing.assert_array_equal(flat[("hc_head_fn",)], ref.hc_head.hc_fn.detach().numpy().T)
    np.testing.assert_array_equal(flat[("head",)], case["hf"].lm_head.weight.detach().numpy())
    np.testing.assert_array_equal(flat[("block", "layers", 0, "attn", "attn_sink")][0],
                                  ref.layer.self_attn.sinks.detach().numpy())


@functools.partial(jax.jit, static_argnames=("graphdef", "capture"))
def _target(graphdef, params, tokens, lengths, cache, capture, num_valid=None):
    _, cache, features = nnx.merge(graphdef, params)(tokens, lengths, cache, capture=capture, num_valid=num_valid)
    return cache, features


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _extend(graphdef, params, state, tokens, features, lengths):
    return nnx.merge(graphdef, params).extend(state, tokens, features, lengths)


@functools.partial(jax.jit, static_argnames=("graphdef", "K"))
def _propose(graphdef, params, state, anchor, lengths, sampling_params, keys, K):
    return nnx.merge(graphdef, params).propose(state, anchor, lengths, sampling_params, keys, K)


def test_chained_drafts_equal_the_reference_across_ragged_rounds(case):
    target, draft, ref = case["target"], case["draft"], case["ref"]
    V = target.config.vocab_size
    K = 3
    full = np.random.default_rng(3).integers(0, V, (2, 40))
    streams = ref.streams(full)  # [2, 40, n, D]
    capture = draft.module.feature_indices
    cache = target.module.init_cache(2, 64, max_block=K + 1)
    state = draft.module.init_state(2, 64)
    prompt = np.array([6, 11])
    tokens = np.zeros((2, 16), np.int32)
    for b in range(2):
        tokens[b, : prompt[b]] = full[b, : prompt[b]]
    zero = jnp.zeros(2, jnp.int32)
    cache, feats = _target(target.graphdef, target.params, jnp.asarray(tokens), zero, cache, capture,
                           jnp.asarray(prompt, jnp.int32))  # padding must not evict ring rows
    np.testing.assert_allclose(np.asarray(feats)[0, :6].reshape(6, *streams.shape[2:]), streams[0, :6].numpy(), atol=1e-5)
    state = _extend(draft.graphdef, draft.params, state, jnp.asarray(tokens), feats, zero)
    lengths = prompt.copy()
    sampling_params = SamplingParams.create(2, temperature=1.0)
    keys = sampling.row_keys(jnp.zeros(2, jnp.uint32), jnp.arange(2, dtype=jnp.uint32))
    for commit in (2, 4, 1):
        anchor = full[np.arange(2), lengths]
        proposal = _propose(draft.graphdef, draft.params, state, jnp.asarray(anchor, jnp.int32),
                            jnp.asarray(lengths, jnp.int32), sampling_params, keys, K)
        drafts, probs = np.asarray(proposal.tokens), np.asarray(proposal.probs)
        for b in range(2):
            n = lengths[b]
            rows_tok = list(full[b, 1 : n + 1])  # row i: (h_i, x_{i+1}), i < n; the anchor's row is i = n - 1
            rows_h = streams[b, :n]
            for j in range(K):
                logits, g = ref.run(rows_tok, rows_h)
                p = torch.softmax(logits[-1], -1).numpy()
                err = np.abs(probs[b, j] - p).max()
                assert err <= TOL, f"row {b} at {n}, step {j}: {err}"
                rows_tok.append(int(drafts[b, j]))
                rows_h = torch.cat([rows_h, g[-1:]], 0)
        # verify block [anchor, wrong drafts]: only `commit` tokens are real and committed
        block = np.stack([full[b, lengths[b] : lengths[b] + K + 1] for b in range(2)]).astype(np.int32)
        block[:, commit:] = (block[:, commit:] + 5) % V
        cache, feats = _target(target.graphdef, target.params, jnp.asarray(block), jnp.asarray(lengths, jnp.int32),
                               cache, capture)
        state = _extend(draft.graphdef, draft.params, state, jnp.asarray(block), feats, jnp.asarray(lengths, jnp.int32))
        lengths += commit


def test_missing_mtp_weights_and_wrong_pairs_are_refused(case, tmp_path):
    import shutil

    saved = tmp_path / "saved"
    case["hf"].save_pretrained(saved)  # transformers writes no mtp.* tensors
    with pytest.raises(CheckpointError, match="holds no mtp.0"):
        dj.load_draft(saved, dtype="float32")
    none = shutil.copytree(case["dir"], tmp_path / "none")
    cfg = json.loads((none / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 0
    (none / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="no MTP module"):
        dj.load_draft(none, dtype="float32")
    dspark = shutil.copytree(case["dir"], tmp_path / "dspark")
    cfg = json.loads((dspark / "config.json").read_text())
    cfg.update(dspark_block_size=5, dspark_target_layer_ids=[0, 1], dspark_markov_rank=8)
    (dspark / "config.json").write_text(json.dumps(cfg))
    # a V4 checkpoint with dspark_* fields is read as a DSpark draft (tests/test_deepseek_v4_dspark.py), not as MTP
    with pytest.raises(ConfigError, match="needs dspark_noise_token_id"):
        dj.load_draft(dspark, dtype="float32")
    import dataclasses

    other = case["target"]
    changed = dataclasses.replace(other, config=dataclasses.replace(other.config, swiglu_limit=3.0))
    with pytest.raises(ConfigError, match="another DeepSeek-V4 target"):
        dj.check_pair(changed, case["draft"])


@pytest.mark.slow
def test_greedy_speculative_with_mtp_equals_plain_greedy(case):
    target, draft = case["target"], case["draft"]
    prompts = [[3, 9, 27, 5, 1], list(range(40, 51))]
    plain = dj.generate(target, None, prompts, max_new_tokens=12, stop_token_ids=[]).tokens
    result = dj.generate(target, draft, prompts, max_new_tokens=12, stop_token_ids=[], draft_length=3)
    assert result.tokens == plain


SPEC_CFG = dict(
    model_type="deepseek_v4", vocab_size=128, hidden_size=64, num_layers=3, num_heads=4, head_dim=32, q_lora_rank=32,
    o_groups=2, o_lora_rank=16, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
    layer_types=("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"),
    mlp_layer_types=("hash_moe", "moe", "moe"), hca_ratio=8, rope_head_dim=8, sliding_window=16, index_n_heads=4,
    index_head_dim=16, index_topk=4, num_mtp_layers=1, max_position_embeddings=4096,
)


@pytest.mark.slow
def test_greedy_speculative_with_oracle_and_mixed_mtp_equals_plain_greedy():
    """A bigram V4 target and MTP modules that know its successor map always (tau = K + 1) or 60% of the time."""
    import inspect

    from dspark_jax.models.deepseek_v4 import DeepseekV4Config
    from dspark_jax.testing import mtp_v4, synthetic

    cfg = DeepseekV4Config(**SPEC_CFG)
    successor = synthetic.random_permutation_successor(cfg.vocab_size, 5)
    target = mtp_v4.bigram_target(cfg, successor, seed=1)
    prompts = [[3, 9, 27], list(range(40, 53))]
    plain = dj.generate(target, None, prompts, max_new_tokens=20, stop_token_ids=[]).tokens
    fixed = {"schedule": "fixed"} if "schedule" in inspect.signature(dj.generate).parameters else {}
    K = 3
    for name, accuracy in (("oracle", 1.0), ("mixed", 0.6)):
        draft = mtp_v4.oracle_mtp(target, successor, accuracy=accuracy, seed=3, max_draft_length=K)
        result = dj.generate(target, draft, prompts, max_new_tokens=20, stop_token_ids=[], draft_length=K, **fixed)
        assert result.tokens == plain, name
        tau = result.stats.mean_acceptance_length
        assert tau > K - 0.5 if name == "oracle" else 1.2 < tau < K + 1, (name, tau)


# --- sampled losslessness ------------------------------------------------------------------------------
# The statistical check of test_spec_sampling.py on a DeepSeek-V4 target built with transformers, drafted by its
# MTP module (soft, wrong-ish distributions, so acceptances, rejections and residual draws all occur): the
# empirical distribution of the first three sampled tokens of N independent rows against the exact distribution
# from transformers' forward over every continuation, processed with transformers' own logits warpers.


@pytest.mark.slow
def test_speculative_sampling_with_mtp_matches_the_target(tmp_path):
    from safetensors.torch import load_file, save_file
    from scipy import stats as scistats
    from spec_helpers import PROMPT, SETTINGS, STEPS, V, empirical, exact_distribution

    hf = build(tmp_path / "hf", seed=6, vocab_size=V, sliding_window=2, index_topk=1,
               compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 4}, **ONE_LAYER)
    with torch.no_grad():  # sharper logits, so the distributions are far from uniform
        hf.model.embed_tokens.weight.mul_(4.0)
    hf.save_pretrained(tmp_path / "hf")
    hub_copy(tmp_path / "hf", tmp_path / "hub", hf)
    ref = MTPReference(hf, seed=60)
    tensors = load_file(tmp_path / "hub" / "model.safetensors")
    tensors.update(ref.hub_tensors())
    save_file(tensors, tmp_path / "hub" / "model.safetensors", metadata={"format": "pt"})
    target = dj.load_target(tmp_path / "hub", dtype="float32")
    draft = dj.load_draft(tmp_path / "hub", dtype="float32")
    n = 2**13
    rng = np.random.default_rng(0)
    for setting in SETTINGS:
        exact = exact_distribution(hf, setting).reshape(-1).astype(np.float64)
        exact /= exact.sum()
        noise = np.mean([0.5 * np.abs(rng.multinomial(n, exact) / n - exact).sum() for _ in range(20)])
        result = dj.generate(target, draft, [PROMPT] * n, max_new_tokens=STEPS, stop_token_ids=[], draft_length=2,
                             seed=3, **setting)
        assert 1.0 < result.stats.mean_acceptance_length < 3.0
        emp = empirical(result.tokens)
        tv = 0.5 * np.abs(emp - exact).sum()
        assert tv - noise <= 0.01, f"{setting}: TV {tv:.4f} vs noise {noise:.4f}"
        assert emp[exact == 0].sum() == 0, f"{setting}: sampled a token the processed target excludes"
        common = exact * n >= 5  # chi-square needs expected counts >= 5: pool the rare outcomes
        observed = np.append(emp[common], emp[~common].sum()) * n
        expected = np.append(exact[common], exact[~common].sum()) * n
        keep = expected > 0
        assert scistats.chisquare(observed[keep], expected[keep]).pvalue > 1e-4, setting
