"""The DeepSeek-V4 DSpark draft (`mtp.0..2` with `main_proj`, Markov and confidence heads) as a proposer.

Tiny checkpoints in the layout of target_families.md §2 are written next to a random transformers-built V4
target (hub layout): the draft blocks' tensors are perturbed copies of a target layer's sliding-attention and
routed-MoE tensors, the rest random.

* Loading: `dj.load_draft(<target checkpoint>)` reads every draft tensor where it belongs (both spellings of
  the Markov and confidence tensors), with the target's embedding and head; strict errors for missing and
  unexpected tensors and for bad `dspark_*` fields; the feature-source switch.
* Rounds: drafted distributions after a ragged prefill and verify rounds with rejected suffixes equal those of a
  fresh draft state built in one `extend` over the committed features only (the cache commits by length).
* Losslessness (slow): greedy speculative == plain greedy with random, oracle and mixed V4 DSpark drafts;
  sampled speculative decoding with the loaded draft matches transformers' exact processed distribution.
"""

from __future__ import annotations

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from deepseek_v4_models import build, hub_copy
from flax import nnx

import dspark_jax as dj
from dspark_jax.config import SamplingParams
from dspark_jax.engine import sampling
from dspark_jax.errors import CheckpointError, ConfigError
from dspark_jax.proposers.dspark_v4 import V4DSparkDraft, load_v4_dspark

ONE_LAYER = dict(num_hidden_layers=2, layer_types=["sliding_attention", "compressed_sparse_attention"],
                 mlp_layer_types=["hash_moe", "moe"])
N_DRAFT = 3
SOURCE_LAYER = "layers.1."  # a routed-MoE layer; its compressor / indexer tensors are not copied


def add_dspark(directory, *, seed: int, layer_ids=(0, 1), block_size=4, rank=8, noise_id=None, spelling="nested",
               scale=1.0):
    """Write a V4 DSpark draft into the hub checkpoint `directory` (tensors and `dspark_*` config fields);
    returns the draft tensors as numpy arrays."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    path = directory / "model.safetensors"
    tensors = load_file(path)
    cfg = json.loads((directory / "config.json").read_text())
    D, V = cfg["hidden_size"], cfg["vocab_size"]
    draft = {}
    for i in range(N_DRAFT):
        for key, value in tensors.items():
            if key.startswith(SOURCE_LAYER) and "compressor" not in key and "indexer" not in key:
                noise = 1 + 0.3 * torch.randn(value.shape, generator=g) if value.is_floating_point() else 1
                draft[f"mtp.{i}." + key[len(SOURCE_LAYER):]] = (value * noise).to(value.dtype).contiguous()
    last = f"mtp.{N_DRAFT - 1}."
    draft["mtp.0.main_proj.weight"] = torch.randn(D, len(layer_ids) * D, generator=g) * D**-0.5 * scale
    draft["mtp.0.main_norm.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
    draft[last + "norm.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
    for name in ("hc_head_fn", "hc_head_base", "hc_head_scale"):
        draft[last + name] = tensors[name] * (1 + 0.2 * torch.randn(tensors[name].shape, generator=g))
    markov = {"nested": "markov_head.markov_w", "flat": "markov_w"}[spelling]
    draft[last + markov + "1"] = torch.randn(V, rank, generator=g) * scale
    draft[last + markov + "2"] = torch.randn(V, rank, generator=g) * rank**-0.5 * scale
    if spelling == "nested":
        draft[last + "confidence_head.proj.weight"] = torch.randn(1, D + rank, generator=g) * 0.1
    else:
        draft[last + "confidence_weight"] = torch.randn(1, D + rank, generator=g) * 0.1
        draft[last + "confidence_bias"] = torch.randn(1, generator=g)
    tensors.update(draft)
    save_file(tensors, path, metadata={"format": "pt"})
    L = cfg["num_hidden_layers"]
    cfg["compress_ratios"] = cfg["compress_ratios"][:L] + [0] * N_DRAFT
    cfg.update(dspark_block_size=block_size, dspark_markov_rank=rank, dspark_target_layer_ids=list(layer_ids),
               dspark_noise_token_id=V - 1 if noise_id is None else noise_id)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    return {k: v.float().numpy() for k, v in draft.items()}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("v4_dspark")
    hf = build(root / "hf", seed=5, **ONE_LAYER)
    hub_copy(root / "hf", root / "hub", hf)
    draft_tensors = add_dspark(root / "hub", seed=50)
    return dict(dir=root / "hub", hf=hf, tensors=draft_tensors, target=dj.load_target(root / "hub", dtype="float32"),
                draft=dj.load_draft(root / "hub", dtype="float32"))


def _flat(draft):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(draft.params)}


def test_load_draft_reads_the_dspark_layout(case):
    draft, target, t = case["draft"], case["target"], case["tensors"]
    assert isinstance(draft.module, V4DSparkDraft)
    dj.check_pair(target, draft)
    cfg = draft.config
    assert (cfg.num_layers, cfg.block_size, cfg.target_layer_ids, cfg.markov_rank) == (N_DRAFT, 4, (0, 1), 8)
    assert cfg.mask_token_id == target.config.vocab_size - 1 and draft.module.has_confidence
    assert draft.module.feature_indices == (0, 1)  # the inputs of target layers 0 and 1 (the default source)
    assert draft.module.max_draft_length == 4
    flat = _flat(draft)
    np.testing.assert_array_equal(flat[("main_proj",)], t["mtp.0.main_proj.weight"].T)
    np.testing.assert_array_equal(flat[("hc_head_fn",)], t["mtp.2.hc_head_fn"].T)
    np.testing.assert_array_equal(flat[("markov_head", "markov_w2")], t["mtp.2.markov_head.markov_w2"])
    np.testing.assert_array_equal(flat[("confidence_head", "proj")], t["mtp.2.confidence_head.proj.weight"].T)
    np.testing.assert_array_equal(flat[("confidence_head", "bias")], np.zeros(1))  # optional, absent here
    for i in range(N_DRAFT):  # each block from its own mtp.{i}
        np.testing.assert_array_equal(flat[("blocks", "layers", 0, "attn", "attn_sink")][i], t[f"mtp.{i}.attn.attn_sink"])
        np.testing.assert_array_equal(flat[("blocks", "layers", 0, "ffn", "bias")][i], t[f"mtp.{i}.ffn.gate.bias"])
    np.testing.assert_array_equal(flat[("head",)], case["hf"].lm_head.weight.detach().numpy())
    np.testing.assert_array_equal(flat[("embed",)], case["hf"].model.embed_tokens.weight.detach().numpy())


def test_flat_spellings_and_the_feature_source_switch(case, tmp_path):
    root = tmp_path / "flat"
    shutil.copytree(case["dir"], root)
    cfg = json.loads((root / "config.json").read_text())
    from safetensors.torch import load_file, save_file

    tensors = {k: v for k, v in load_file(root / "model.safetensors").items() if not k.startswith("mtp.")}
    save_file(tensors, root / "model.safetensors", metadata={"format": "pt"})
    t = add_dspark(root, seed=51, layer_ids=(0,), spelling="flat")
    draft = dj.load_draft(root, dtype="float32")
    flat = _flat(draft)
    np.testing.assert_array_equal(flat[("markov_head", "markov_w1")], t["mtp.2.markov_w1"])
    np.testing.assert_array_equal(flat[("confidence_head", "proj")], t["mtp.2.confidence_weight"].T)
    np.testing.assert_array_equal(flat[("confidence_head", "bias")], t["mtp.2.confidence_bias"])
    assert draft.module.feature_indices == (0,)
    out = load_v4_dspark(root, dtype="float32", feature_source="output")
    assert out.module.feature_indices == (1,)  # the output of layer 0
    dj.check_pair(case["target"], out)
    cfg = json.loads((root / "config.json").read_text())
    cfg["dspark_target_layer_ids"] = [1]  # the last of 2 layers: its output is final-normed
    cfg["dspark_feature_source"] = "output"
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="last layer 1"):
        dj.load_draft(root, dtype="float32")
    with pytest.raises(ConfigError, match="feature_source 'middle'"):
        load_v4_dspark(root, dtype="float32", feature_source="middle")


def _variant(case, tmp_path, name, *, drop=(), add=None, config=None):
    from safetensors.torch import load_file, save_file

    root = shutil.copytree(case["dir"], tmp_path / name)
    tensors = {k: v for k, v in load_file(root / "model.safetensors").items() if k not in drop}
    tensors.update(add or {})
    save_file(tensors, root / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((root / "config.json").read_text())
    for k, v in (config or {}).items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (root / "config.json").write_text(json.dumps(cfg))
    return root


def test_missing_unexpected_and_bad_fields_are_refused(case, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(case["dir"] / "model.safetensors")
    bad = _variant(case, tmp_path, "missing", drop=("mtp.1.attn.wkv.weight",))
    with pytest.raises(CheckpointError, match="mtp.1.attn.wkv.weight"):
        dj.load_draft(bad, dtype="float32")
    bad = _variant(case, tmp_path, "no_markov", drop=("mtp.2.markov_head.markov_w1",))
    with pytest.raises(CheckpointError, match="markov"):
        dj.load_draft(bad, dtype="float32")
    bad = _variant(case, tmp_path, "extra_block", add={"mtp.3.attn_norm.weight": tensors["mtp.0.attn_norm.weight"]})
    with pytest.raises(CheckpointError, match="mtp.3.attn_norm"):
        dj.load_draft(bad, dtype="float32")
    bad = _variant(case, tmp_path, "mtp_tensor", add={"mtp.0.e_proj.weight": tensors["mtp.0.main_proj.weight"][:, :32].contiguous()})
    with pytest.raises(CheckpointError, match="e_proj"):
        dj.load_draft(bad, dtype="float32")
    bad = _variant(case, tmp_path, "compressed_block", add={"mtp.0.attn.compressor.ape": tensors["layers.1.attn.compressor.ape"]})
    with pytest.raises(CheckpointError, match="compressor"):
        dj.load_draft(bad, dtype="float32")
    no_draft = _variant(case, tmp_path, "no_draft", drop=tuple(k for k in tensors if k.startswith("mtp.")))
    with pytest.raises(CheckpointError, match="holds no mtp.0.main_proj"):
        dj.load_draft(no_draft, dtype="float32")
    for field, value, match in (("dspark_noise_token_id", None, "needs dspark_noise_token_id"),
                                ("dspark_noise_token_id", 10**6, "outside the vocabulary"),
                                ("dspark_target_layer_ids", [0, 5], "layer 5 is outside"),
                                ("dspark_block_size", 0, "must be >= 1"),
                                ("compress_ratios", [0, 4, 0, 4, 0], "must be 0 \\(sliding only\\)"),
                                ("compress_ratios", [0, 4], "cannot tell the DSpark draft depth")):
        bad = _variant(case, tmp_path, f"{field}_{value}".replace(" ", ""), config={field: value})
        with pytest.raises(ConfigError, match=match):
            dj.load_draft(bad, dtype="float32")
    import dataclasses

    other = case["target"]
    changed = dataclasses.replace(other, config=dataclasses.replace(other.config, swiglu_limit=3.0))
    with pytest.raises(ConfigError, match="another DeepSeek-V4 target"):
        dj.check_pair(changed, case["draft"])


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


def test_cached_rounds_equal_a_fresh_state_over_the_committed_context(case):
    """Ragged prefill, then verify blocks whose suffix is rejected: each round's drafts (tokens, distributions,
    confidences) equal those of a fresh state built from the committed positions' features only (junk rows past them),
    taken from a separate chunked target forward over the true tokens. The window (8) is shorter than the context, so the sliding mask matters."""
    target, draft = case["target"], case["draft"]
    V, K = target.config.vocab_size, draft.module.max_draft_length
    capture = draft.module.feature_indices
    full = np.random.default_rng(7).integers(0, V - 1, (2, 64)).astype(np.int32)
    C = 64
    cache = target.module.init_cache(2, C, max_block=K + 1)
    state = draft.module.init_state(2, C)
    prompt = np.array([5, 13])
    tokens = np.zeros((2, 16), np.int32)
    for b in range(2):
        tokens[b, : prompt[b]] = full[b, : prompt[b]]
    zero = jnp.zeros(2, jnp.int32)
    cache, feats = _target(target.graphdef, target.params, jnp.asarray(tokens), zero, cache, capture,
                           jnp.asarray(prompt, jnp.int32))
    state = _extend(draft.graphdef, draft.params, state, jnp.asarray(tokens), feats, zero)
    lengths = prompt.copy()
    sp = SamplingParams.create(2, temperature=1.0)
    keys = sampling.row_keys(jnp.zeros(2, jnp.uint32), jnp.arange(2, dtype=jnp.uint32))
    chunks, ref_cache = [], target.module.init_cache(2, C, max_block=K + 1)  # cache-free reference in 16-token chunks
    for s in range(0, C, 16):  # (the prefill's compiled shape)
        ref_cache, f = _target(target.graphdef, target.params, jnp.asarray(full[:, s : s + 16]), zero + s, ref_cache,
                               capture, jnp.full(2, 16, jnp.int32))
        chunks.append(np.asarray(f))
    all_feats = np.concatenate(chunks, axis=1)
    for commit in (2, 5, 1, 3):
        anchor = jnp.asarray(full[np.arange(2), lengths], jnp.int32)
        got = _propose(draft.graphdef, draft.params, state, anchor, jnp.asarray(lengths, jnp.int32), sp, keys, K)
        fresh = draft.module.init_state(2, C)
        committed = np.where(np.arange(C)[None, :, None] < lengths[:, None, None], all_feats, 1e3)  # junk past `lengths`
        for s in range(0, C, 16):
            fresh = _extend(draft.graphdef, draft.params, fresh, jnp.asarray(full[:, s : s + 16]),
                            jnp.asarray(committed[:, s : s + 16]), zero + s)
        want = _propose(draft.graphdef, draft.params, fresh, anchor, jnp.asarray(lengths, jnp.int32), sp, keys, K)
        np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
        np.testing.assert_allclose(np.asarray(got.probs), np.asarray(want.probs), atol=2e-6)
        np.testing.assert_allclose(np.asarray(got.confidence_logits), np.asarray(want.confidence_logits), atol=1e-5)
        assert np.abs(np.asarray(got.probs).sum(-1) - 1).max() < 1e-5
        block = np.stack([full[b, lengths[b] : lengths[b] + K + 1] for b in range(2)]).astype(np.int32)
        block[:, commit:] = (block[:, commit:] + 5) % (V - 1)  # a rejected suffix, written ahead
        cache, feats = _target(target.graphdef, target.params, jnp.asarray(block), jnp.asarray(lengths, jnp.int32),
                               cache, capture)
        state = _extend(draft.graphdef, draft.params, state, jnp.asarray(block), feats, jnp.asarray(lengths, jnp.int32))
        lengths += commit
    # the context matters: a state missing the committed rows drafts differently
    empty = _propose(draft.graphdef, draft.params, draft.module.init_state(2, C), anchor,
                     jnp.asarray(lengths - commit, jnp.int32), sp, keys, K)
    assert np.abs(np.asarray(empty.probs) - np.asarray(got.probs)).max() > 1e-3


# --- losslessness -------------------------------------------------------------------------------------------

SPEC_CFG = dict(
    model_type="deepseek_v4", vocab_size=128, hidden_size=64, num_layers=3, num_heads=4, head_dim=32, q_lora_rank=32,
    o_groups=2, o_lora_rank=16, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
    layer_types=("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"),
    mlp_layer_types=("hash_moe", "moe", "moe"), hca_ratio=8, rope_head_dim=8, sliding_window=16, index_n_heads=4,
    index_head_dim=16, index_topk=4, max_position_embeddings=4096,
)


@pytest.mark.slow
def test_greedy_speculative_with_random_oracle_and_mixed_dspark_equals_plain_greedy():
    """A random draft on a random V4 target (tau ~ 1), and on a bigram V4 target drafts whose Markov head knows its
    successor map always (tau = K + 1) or 60% of the time."""
    from dspark_jax.handles import Target
    from dspark_jax.models.deepseek_v4 import DeepseekV4Config
    from dspark_jax.testing import dspark_v4, mtp_v4, synthetic

    cfg = DeepseekV4Config(**SPEC_CFG)
    successor = synthetic.random_permutation_successor(cfg.vocab_size, 5)
    bigram = mtp_v4.bigram_target(cfg, successor, seed=1)
    rand = Target.random(cfg, seed=2)
    prompts = [[3, 9, 27], list(range(40, 53))]
    K = 4
    arms = {"random": (rand, dspark_v4.random_dspark(rand, seed=2, block_size=K)),
            "oracle": (bigram, dspark_v4.oracle_dspark(bigram, successor, seed=3, block_size=K)),
            "mixed": (bigram, dspark_v4.oracle_dspark(bigram, successor, accuracy=0.6, seed=3, block_size=K))}
    plain = {}
    for name, (target, draft) in arms.items():
        dj.check_pair(target, draft)
        if id(target) not in plain:
            plain[id(target)] = dj.generate(target, None, prompts, max_new_tokens=20, stop_token_ids=[]).tokens
        result = dj.generate(target, draft, prompts, max_new_tokens=20, stop_token_ids=[], draft_length=K,
                             schedule="fixed")
        assert result.tokens == plain[id(target)], name
        tau = result.stats.mean_acceptance_length
        assert {"random": tau < 1.5, "oracle": tau > K + 0.5, "mixed": 1.2 < tau < K + 0.5}[name], (name, tau)


@pytest.mark.slow
def test_speculative_sampling_with_dspark_matches_the_target(tmp_path):
    """test_spec_sampling.py's statistical check on a transformers-built V4 target drafted by its loaded DSpark draft
    (soft, partly wrong distributions: acceptances, rejections and residual draws all occur)."""
    from scipy import stats as scistats
    from spec_helpers import PROMPT, SETTINGS, STEPS, V, empirical, exact_distribution

    hf = build(tmp_path / "hf", seed=6, vocab_size=V, sliding_window=2, index_topk=1,
               compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 4}, **ONE_LAYER)
    with torch.no_grad():  # sharper logits, so the distributions are far from uniform
        hf.model.embed_tokens.weight.mul_(4.0)
    hf.save_pretrained(tmp_path / "hf")
    hub_copy(tmp_path / "hf", tmp_path / "hub", hf)
    add_dspark(tmp_path / "hub", seed=60, block_size=3, rank=4, noise_id=V - 1, scale=2.0)
    target = dj.load_target(tmp_path / "hub", dtype="float32")
    draft = dj.load_draft(tmp_path / "hub", dtype="float32")
    n = 2**13
    rng = np.random.default_rng(0)
    for setting in SETTINGS:
        exact = exact_distribution(hf, setting).reshape(-1).astype(np.float64)
        exact /= exact.sum()
        noise = np.mean([0.5 * np.abs(rng.multinomial(n, exact) / n - exact).sum() for _ in range(20)])
        result = dj.generate(target, draft, [PROMPT] * n, max_new_tokens=STEPS, stop_token_ids=[], draft_length=2,
                             seed=3, schedule="fixed", **setting)
        assert 1.0 < result.stats.mean_acceptance_length < 3.0, result.stats.mean_acceptance_length
        emp = empirical(result.tokens)
        tv = 0.5 * np.abs(emp - exact).sum()
        assert tv - noise <= 0.01, f"{setting}: TV {tv:.4f} vs noise {noise:.4f}"
        assert emp[exact == 0].sum() == 0, f"{setting}: sampled a token the processed target excludes"
        common = exact * n >= 5  # chi-square needs expected counts >= 5: pool the rare outcomes
        observed = np.append(emp[common], emp[~common].sum()) * n
        expected = np.append(exact[common], exact[~common].sum()) * n
        keep = expected > 0
        assert scistats.chisquare(observed[keep], expected[keep]).pvalue > 1e-4, setting
