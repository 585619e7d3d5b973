"""The DeepSeek-V3 MTP module as a proposer.

* Loading: `dj.load_draft(<target checkpoint>)` reads `model.layers.{L}.*` of the target directory (hub layout,
  written here from a randomised transformers `MtpModel`; transformers itself loads the same file), FP8 too.
* Numerics: after a prefill and rounds of ragged verify blocks with rejected suffixes, the drafted
  distributions equal transformers' `MtpModel` run on the committed sequence: MTP-1, and chained MTP-3 where
  each step feeds the previous step's post-normed output and drafted token (transformers' chaining), the
  reference being the same transformers layer over the whole sequence without a cache.
* Losslessness: greedy speculative decoding with random, oracle and mixed MTP drafts equals plain greedy
  decoding on DeepSeek-V3 targets, for MTP-1 and chained MTP-k; one compilation across sampling settings.
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
from deepseek_models import build, fp8_copy, hf_mtp
from flax import nnx
from spec_helpers import plain_greedy

import dspark_jax as dj
from dspark_jax.config import SamplingParams
from dspark_jax.engine import sampling, spec
from dspark_jax.errors import CheckpointError, ConfigError
from dspark_jax.models.deepseek_v3 import DeepseekV3Config
from dspark_jax.proposers.mtp import MTPProposer
from dspark_jax.testing import mtp as synthetic_mtp
from dspark_jax.testing import synthetic

TOL = 1e-6  # on probabilities (vocabulary 64, so about 1e-5 relative)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 0.8, "mscale_all_dim": 1.0}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    directory = tmp_path_factory.mktemp("v3_mtp")
    build(directory, seed=3, mtp=True, rope_scaling=YARN)
    main, mtp = hf_mtp(directory)
    return dict(dir=directory, hf=main, mtp=mtp, target=dj.load_target(directory, dtype="float32"),
                draft=dj.load_draft(directory, dtype="float32"))


def test_load_draft_reads_the_mtp_module_of_the_target_checkpoint(case):
    draft, target, mtp = case["draft"], case["target"], case["mtp"]
    assert isinstance(draft.module, MTPProposer)
    dj.check_pair(target, draft)
    assert draft.module.feature_indices == (target.config.num_layers,)
    flat = dict(nnx.to_flat_state(draft.params))
    np.testing.assert_array_equal(np.asarray(flat[("eh_proj",)].get_value()), mtp.layers[0].eh_proj.weight.detach().numpy().T)
    np.testing.assert_array_equal(np.asarray(flat[("enorm",)].get_value()), mtp.layers[0].enorm.weight.detach().numpy())
    np.testing.assert_array_equal(np.asarray(flat[("shared_head_norm",)].get_value()),
                                  mtp.layers[0].post_norm.weight.detach().numpy())


@functools.partial(jax.jit, static_argnames=("graphdef", "capture"))
def _target(graphdef, params, tokens, lengths, cache, capture):
    hidden, cache, features = nnx.merge(graphdef, params)(tokens, lengths, cache, capture=capture)
    return cache, features


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _extend(graphdef, params, state, tokens, features, lengths):
    return nnx.merge(graphdef, params).extend(state, tokens, features, lengths)


@functools.partial(jax.jit, static_argnames=("graphdef", "K"))
def _propose(graphdef, params, state, anchor, lengths, sampling_params, keys, K):
    return nnx.merge(graphdef, params).propose(state, anchor, lengths, sampling_params, keys, K)


def _hf_chain(mtp, tokens, hidden, drafts):
    """transformers' MTP layer over the whole sequence for each chained step: step j sees tokens
    `x_1..x_n, d_1..d_{j-1}` and hidden states `h_0..h_{n-1}, g_1..g_{j-1}` (g = its post-normed outputs)."""
    toks, hs = torch.as_tensor(tokens)[None], torch.as_tensor(hidden)[None]
    out = []
    with torch.no_grad():
        for j in range(len(drafts) + 1):
            pos = torch.arange(toks.shape[1])[None]
            g = mtp.forward_layer(0, hs, position_ids=pos, mtp_cache=None, input_ids=toks)
            out.append(torch.softmax(mtp._project_to_logits(g[:, -1]), dim=-1)[0].numpy())
            if j < len(drafts):
                toks = torch.cat([toks, torch.tensor([[drafts[j]]])], dim=1)
                hs = torch.cat([hs, g[:, -1:]], dim=1)
    return np.stack(out)


def test_drafts_equal_transformers_mtp_across_ragged_rounds(case):
    """Prefill ragged prompts, then verify blocks at per-row offsets whose suffixes are partly rejected;
    before every round the MTP-1 and chained MTP-3 distributions equal transformers'."""
    target, draft, hf, mtp = case["target"], case["draft"], case["hf"], case["mtp"]
    L, K, B = target.config.num_layers, 3, 2
    rng = np.random.default_rng(0)
    full = rng.integers(0, target.config.vocab_size, (B, 48))
    with torch.no_grad():
        hidden = hf(torch.as_tensor(full), output_hidden_states=True).hidden_states[-1].numpy()
    lengths = np.array([6, 11])
    tokens = np.zeros((B, 16), np.int32)
    for b in range(B):
        tokens[b, : lengths[b]] = full[b, : lengths[b]]
    cache = target.module.init_cache(B, 64)
    cache, features = _target(target.graphdef, target.params, jnp.asarray(tokens), jnp.zeros(B, jnp.int32), cache, (L,))
    state = _extend(draft.graphdef, draft.params, draft.module.init_state(B, 64), jnp.asarray(tokens), features,
                    jnp.zeros(B, jnp.int32))
    params = SamplingParams.create(B, temperature=1.0)
    keys = sampling.row_keys(jnp.zeros(B, jnp.uint32), jnp.arange(B, dtype=jnp.uint32))
    for _ in range(5):
        anchor = full[np.arange(B), lengths]
        prop = _propose(draft.graphdef, draft.params, state, jnp.asarray(anchor, jnp.int32), jnp.asarray(lengths, jnp.int32),
                        params, keys, K)
        drafts, probs = np.asarray(prop.tokens), np.asarray(prop.probs)
        for b in range(B):
            n = lengths[b]
            ref = _hf_chain(mtp, full[b, 1 : n + 1], hidden[b, :n], drafts[b, : K - 1].tolist())
            err = np.abs(probs[b] - ref).max(axis=-1)
            assert np.all(err <= TOL), f"row {b} at length {n}: step errors {err}"
        accepted = rng.integers(0, K + 1, B)
        block = rng.integers(0, target.config.vocab_size, (B, K + 1))  # rejected drafts: anything
        for b in range(B):
            block[b, : accepted[b] + 1] = full[b, lengths[b] : lengths[b] + accepted[b] + 1]
        cache, features = _target(target.graphdef, target.params, jnp.asarray(block, jnp.int32),
                                  jnp.asarray(lengths, jnp.int32), cache, (L,))
        state = _extend(draft.graphdef, draft.params, state, jnp.asarray(block, jnp.int32), features,
                        jnp.asarray(lengths, jnp.int32))
        lengths = lengths + accepted + 1


@pytest.mark.slow
def test_bfloat16_speculative_run(case):
    """bf16 target and MTP module (XLA:CPU kernels included) run speculative rounds end to end."""
    target = dj.load_target(case["dir"], dtype="bfloat16")
    draft = dj.load_draft(case["dir"], dtype="bfloat16")
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    for K, temperature in [(1, 0.0), (3, 0.8)]:
        result = dj.generate(target, draft, prompts, max_new_tokens=10, stop_token_ids=[], draft_length=K,
                             temperature=temperature)
        assert [len(t) for t in result.tokens] == [10, 10]
        assert all(0 <= x < target.config.vocab_size for t in result.tokens for x in t)
        assert result.stats.mean_acceptance_length >= 1


def test_fp8_mtp_checkpoint(case, tmp_path):
    """The MTP module of an FP8 checkpoint loads as the float32 checkpoint of its dequantised weights."""
    fp8_copy(case["dir"], tmp_path / "fp8", (16, 16))
    a, b = dj.load_draft(tmp_path / "fp8", dtype="float32"), dj.load_draft(tmp_path / "fp8_dequantised", dtype="float32")
    fa, fb = dict(nnx.to_flat_state(a.params)), dict(nnx.to_flat_state(b.params))
    assert fa.keys() == fb.keys()
    for path in fa:
        np.testing.assert_array_equal(np.asarray(fa[path].get_value()), np.asarray(fb[path].get_value()), err_msg=str(path))
    quantised = json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]
    assert quantised["weight_block_size"] == [16, 16]


def test_missing_mtp_weights_and_wrong_pairs_are_refused(case, tmp_path):
    hf = case["hf"]
    saved = tmp_path / "saved"
    hf.save_pretrained(saved)  # transformers drops the MTP module when saving
    with pytest.raises(CheckpointError, match="holds no model.layers.3"):
        dj.load_draft(saved, dtype="float32")
    no_mtp = tmp_path / "no_mtp"
    shutil.copytree(saved, no_mtp)
    cfg = json.loads((no_mtp / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 0
    (no_mtp / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="no MTP module"):
        dj.load_draft(no_mtp, dtype="float32")
    other = dj.Target.random(SPEC_CFG)
    with pytest.raises(ConfigError, match="another DeepSeek-V3 target"):
        dj.check_pair(other, case["draft"])
    qwen = dj.Target.random(dj.Qwen3Config(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64,
                                           num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16))
    with pytest.raises(ConfigError, match="not a Qwen3Config"):
        dj.check_pair(qwen, case["draft"])


# --- losslessness ---------------------------------------------------------------------------------------

SPEC_CFG = DeepseekV3Config(
    model_type="deepseek_v3", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
    kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, q_lora_rank=48, moe_intermediate_size=32,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
    first_k_dense_replace=1, max_position_embeddings=512, num_mtp_layers=1,
)
SUCCESSOR = synthetic.random_permutation_successor(SPEC_CFG.vocab_size, seed=5)
PROMPTS = [[3, 9, 27], list(range(40, 53)), [101], list(range(7, 33))]
NEW = 24


def _random_target(seed=0, std=0.15):
    t = dj.Target.random(SPEC_CFG, seed=seed)
    params = jax.tree.map(lambda x: x * (std / 0.02), t.params)
    for path, var in nnx.to_flat_state(params):
        if "norm" in str(path[-1]):
            var.set_value(jnp.ones(var.get_value().shape, var.get_value().dtype))
    return t.with_params(params)


@pytest.fixture(scope="module")
def arms():
    bigram = synthetic.bigram_target(SPEC_CFG, successor=SUCCESSOR, seed=1)
    random = _random_target()
    return {
        "random": (random, synthetic_mtp.random_mtp(random, seed=2)),
        "oracle": (bigram, synthetic_mtp.oracle_mtp(bigram, SUCCESSOR)),
        "mixed": (bigram, synthetic_mtp.oracle_mtp(bigram, SUCCESSOR, accuracy=0.6, seed=3)),
    }


@pytest.fixture(scope="module")
def plain(arms):
    return plain_greedy(arms, PROMPTS, NEW)


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("kind", ["random", "oracle", "mixed"])
def test_greedy_speculative_equals_plain_greedy(arms, plain, kind, K):
    target, draft = arms[kind]
    # fixed rounds: the acceptance checks need every chain verified (scheduled rounds: tests/test_schedule.py)
    result = dj.generate(target, draft, PROMPTS, max_new_tokens=NEW, stop_token_ids=[], draft_length=K, schedule="fixed")
    assert result.tokens == plain[kind]
    tau = result.stats.mean_acceptance_length
    if kind == "oracle":
        assert all(all(a == K + 1 for a in row[:-1]) for row in result.stats.acceptance_lengths)
    elif kind == "random":
        assert tau < 1.3
    elif K > 1:
        assert 1.05 < tau < K + 1


def test_one_compilation_across_settings(arms):
    target, draft = arms["mixed"]
    before = spec.generate_loop._cache_size()
    for temperature, top_k, top_p, seed in [(0.0, 0, 1.0, 0), (0.8, 5, 0.9, 1), (1.3, 0, 0.5, 7)]:
        dj.generate(target, draft, PROMPTS, max_new_tokens=NEW, stop_token_ids=[], draft_length=3,
                    temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    assert spec.generate_loop._cache_size() - before <= 1
    before_step = spec.spec_step._cache_size()
    rounds = sum(1 for _ in dj.stream(target, draft, PROMPTS, max_new_tokens=12, stop_token_ids=[], draft_length=3,
                                      temperature=0.9))
    assert rounds > 2
    assert spec.spec_step._cache_size() - before_step == 1
