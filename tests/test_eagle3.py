"""EAGLE-3 drafts (docs/eagle3.md): losslessness (greedy token for token, sampled in distribution), the
reduced-vocabulary checkpoint layout with its d2t mapping, what is refused, and export round trips.

References are independent of the code under test: plain greedy decoding, transformers' forward with its own
logits warpers (spec_helpers), and the golden outputs of the PyTorch reference (tests/data/golden/eagle3_qwen3).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import qwen3
from safetensors.numpy import load_file, save_file
from scipy import stats as scistats
from spec_helpers import PROMPT, SETTINGS, STEPS, V, empirical, exact_distribution

import dspark_jax as dj
from dspark_jax.config import RopeConfig, SamplingParams
from dspark_jax.errors import CheckpointError, ConfigError
from dspark_jax.models.qwen3 import Qwen3Config
from dspark_jax.proposers import eagle3_checkpoint
from dspark_jax.testing import synthetic
from dspark_jax.testing import synthetic_eagle3 as se

GOLDEN = Path(__file__).parent / "data" / "golden" / "eagle3_qwen3"
CFG = Qwen3Config(
    model_type="qwen3", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=6, num_heads=4,
    num_kv_heads=2, head_dim=16, rope=RopeConfig(theta=1e6), max_position_embeddings=512,
)
IDS = (0, 1, 2, 3, 4)  # the reference's count of feature layers, never the last
SUCCESSOR = synthetic.random_permutation_successor(CFG.vocab_size, seed=5)
PROMPTS = [[3, 9, 27], list(range(40, 53)), [101], list(range(7, 33))]
NEW = 28


def random_target(seed=0, std=0.15):
    """Random weights large enough that logits are decisive (greedy far from ties)."""
    t = dj.Target.random(CFG, seed=seed)
    params = jax.tree.map(lambda x: x * (std / 0.02), t.params)
    for path, var in nnx.to_flat_state(params):
        if "norm" in str(path[-1]):
            var.set_value(np.ones(var.get_value().shape, np.float32))
    return t.with_params(params)


@pytest.fixture(scope="module")
def arms():
    bigram = synthetic.bigram_target(CFG, successor=SUCCESSOR, seed=1)
    cfg = se.config_for(CFG, target_layer_ids=IDS, attention_bias=True)  # one graph for all arms: one compilation per K
    reduced = se.config_for(CFG, target_layer_ids=(0, 2, 4), attention_bias=True, draft_vocab_size=96)
    target = random_target()
    arms = {
        "random": (target, se.random_draft(target, cfg, seed=2)),
        "oracle": (bigram, se.oracle_draft(bigram, cfg, SUCCESSOR)),
        "mixed": (bigram, se.oracle_draft(bigram, cfg, SUCCESSOR, accuracy=0.6, seed=3)),
        "reduced_random": (target, se.random_draft(target, reduced, seed=4)),
        "reduced_oracle": (bigram, se.oracle_draft(bigram, reduced, SUCCESSOR, seed=5)),
    }
    plain = {id(t): dj.generate(t, None, PROMPTS, max_new_tokens=NEW, stop_token_ids=[]).tokens for t in (bigram, target)}
    return arms, plain


@pytest.mark.parametrize("K", [1, pytest.param(3, marks=pytest.mark.slow), 7])  # K=3 runs with -m slow
@pytest.mark.parametrize("kind", ["random", "oracle", "mixed"])
def test_greedy_speculative_equals_plain_greedy(arms, kind, K):
    models, plain = arms
    target, draft = models[kind]
    dj.check_pair(target, draft)
    # fixed rounds: the acceptance checks below need every drafted chain verified (the scheduled path's
    # losslessness is tests/test_schedule.py's)
    result = dj.generate(target, draft, PROMPTS, max_new_tokens=NEW, stop_token_ids=[], draft_length=K, schedule="fixed")
    assert result.tokens == plain[id(target)]
    tau = result.stats.mean_acceptance_length
    if kind == "oracle":  # every round accepts the whole chain plus the bonus token
        assert all(all(a == K + 1 for a in row) for row in result.stats.acceptance_lengths)
    elif kind == "random":
        assert tau < 1.3
    else:
        assert 1.05 < tau < K + 1


@pytest.mark.parametrize("kind", ["reduced_random", "reduced_oracle"])
def test_reduced_vocabulary_greedy_is_lossless(arms, kind):
    """Drafts come from a 96-token subset of the 128-token vocabulary (d2t); the output is still the target's."""
    models, plain = arms
    target, draft = models[kind]
    result = dj.generate(target, draft, PROMPTS, max_new_tokens=NEW, stop_token_ids=[], draft_length=7, schedule="fixed")
    assert result.tokens == plain[id(target)]
    vocab = set(np.asarray(draft.module.vocab_map[...]).tolist())
    if kind == "reduced_oracle":  # chains run until the successor leaves the draft vocabulary
        assert result.stats.mean_acceptance_length > 2.0
    proposal = draft.module.propose(draft.module.init_state(1, 8), jnp.asarray([5]), jnp.asarray([1]),
                                    SamplingParams.create(1, temperature=1.0), jax.random.split(jax.random.key(0), 1), 7)
    assert set(np.asarray(proposal.tokens[0]).tolist()) <= vocab
    outside = np.setdiff1d(np.arange(CFG.vocab_size), sorted(vocab))
    assert float(jnp.max(proposal.probs[0][:, outside])) == 0.0


@pytest.fixture(scope="module")
def sampling_setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_v8_eagle3")
    hf = qwen3(
        directory, seed=3, vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    )
    with torch.no_grad():  # sharper logits than the default init so the distributions are far from uniform
        hf.lm_head.weight.mul_(6.0)
    hf.save_pretrained(directory)
    target = dj.load_target(directory, dtype="float32")
    with torch.no_grad():
        successor = hf(torch.as_tensor([PROMPT + [x] for x in range(V)])).logits[:, -1].argmax(-1).numpy()
    full = se.config_for(target.config, target_layer_ids=(0,), attention_bias=True)
    reduced = se.config_for(target.config, target_layer_ids=(0,), attention_bias=True, draft_vocab_size=6)
    drafts = {
        "full": se.oracle_draft(target, full, successor, accuracy=0.7, strength=4.0, seed=4),
        "reduced": se.oracle_draft(target, reduced, successor, accuracy=0.7, strength=4.0, seed=6),
    }
    return hf, target, drafts


@pytest.mark.parametrize("kind,K", [pytest.param("full", 1, marks=pytest.mark.slow), ("full", 4),
                                    pytest.param("reduced", 3, marks=pytest.mark.slow)])
def test_speculative_sampling_matches_target(sampling_setup, kind, K):
    """Same bound and method as tests/test_spec_sampling.py: TV excess over the sampling noise <= 0.01 and a
    chi-square goodness-of-fit test, against transformers' processed target distribution."""
    hf, target, drafts = sampling_setup
    draft = drafts[kind]
    N = 2**15
    rng = np.random.default_rng(K)
    for setting in SETTINGS:
        exact = exact_distribution(hf, setting).reshape(-1).astype(np.float64)
        exact /= exact.sum()
        noise = np.mean([0.5 * np.abs(rng.multinomial(N, exact) / N - exact).sum() for _ in range(20)])
        result = dj.generate(target, draft, [PROMPT] * N, max_new_tokens=STEPS, stop_token_ids=[], draft_length=K,
                             seed=100 * K + len(kind), schedule="fixed", **setting)
        assert all(len(t) == STEPS for t in result.tokens)
        emp = empirical(result.tokens)
        tv = 0.5 * np.abs(emp - exact).sum()
        assert tv - noise <= 0.01, f"{kind} K={K} {setting}: TV {tv:.4f} vs noise {noise:.4f}"
        assert emp[exact == 0].sum() == 0, "sampled a token the processed target distribution excludes"
        expected = exact * N
        common = expected >= 5
        observed, expected = emp[common] * N, expected[common]
        if exact[~common].sum() > 0:
            observed = np.append(observed, emp[~common].sum() * N)
            expected = np.append(expected, exact[~common].sum() * N)
        assert scistats.chisquare(observed, expected).pvalue > 1e-4, f"{kind} K={K} {setting}"
        rate = np.mean([row[0] > 0 for row in result.stats.accepted_draft_lengths])
        assert 0.02 < rate < 0.98, f"first-draft acceptance rate {rate:.3f}"


# --- the reduced-vocabulary checkpoint layout ---------------------------------------------------------------
def _reduced_layout(tmp: Path, keep: np.ndarray, *, drop=(), config_edits=None, d2t=None) -> Path:
    """The golden DeepSpec draft rewritten in the widely used EAGLE-3 layout: `midlayer.*` keys, an `lm_head`
    over the draft vocabulary `keep`, `d2t` (target id - draft id) and `t2d`, feature layers in `eagle_config`."""
    src = load_file(GOLDEN / "draft" / "model.safetensors")
    out = {}
    for key, value in src.items():
        key = key.replace("layers.0.", "midlayer.")
        if key not in drop:
            out[key] = value[keep] if key == "lm_head.weight" else value
    out["d2t"] = (keep - np.arange(len(keep))).astype(np.int64) if d2t is None else d2t
    t2d = np.zeros(128, bool)
    t2d[keep] = True
    out["t2d"] = t2d
    cfg = json.loads((GOLDEN / "draft" / "config.json").read_text())
    for key in ("target_layer_ids", "ttt_length", "num_target_layers", "draft_num_hidden_layers", "step_loss_decay",
                "target_model_name_or_path", "rope_parameters"):
        cfg.pop(key)
    cfg.update(architectures=["LlamaForCausalLMEagle3"], model_type="llama", draft_vocab_size=len(keep),
               rope_theta=1e6, rope_scaling=None, eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 2, 4, 5, 6]})
    cfg.update(config_edits or {})
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(out, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(cfg))
    return tmp


@pytest.fixture(scope="module")
def golden():
    ref = load_file(GOLDEN / "reference.safetensors")
    meta = json.loads((GOLDEN / "reference.json").read_text())
    return ref, meta, dj.load_target(GOLDEN / "target", dtype="float32")


def _subset(ref, size=96, seed=0):
    """A draft vocabulary that keeps every token the golden schedule drafts and drops others."""
    needed = set(ref["schedule.draft_tokens"].reshape(-1).tolist())
    rest = [t for t in np.random.default_rng(seed).permutation(128).tolist() if t not in needed]
    return np.array(sorted(needed | set(rest[: size - len(needed)])), np.int64)


@pytest.mark.slow  # tests/test_eagle3_golden.py replays the golden schedule in the default run
def test_reduced_layout_reproduces_the_golden_schedule(golden, tmp_path):
    """Same weights as the golden draft, head restricted to a draft vocabulary: logits of kept tokens, hidden
    states and drafts are the reference's; dropped tokens get no probability."""
    ref, meta, target = golden
    keep = _subset(ref)
    draft = dj.load_draft(_reduced_layout(tmp_path / "d", keep), dtype="float32")
    dj.check_pair(target, draft)
    module = draft.module
    assert draft.config.reduced_vocab and draft.config.head_vocab_size == len(keep)
    assert np.asarray(module.vocab_map[...]).tolist() == keep.tolist()
    S, F = ref["schedule.token_ids"], jnp.asarray(ref["schedule.context_features"])[None]
    starts = ref["schedule.start"].astype(np.int32)
    state = module.init_state(1, 40)
    greedy, keys, committed = SamplingParams.create(1), jax.random.split(jax.random.key(0), 1), 0
    dropped = np.setdiff1d(np.arange(128), keep)
    for r, start in enumerate(starts):
        state = module.extend(state, jnp.asarray(S[None, committed:start], jnp.int32), F[:, committed:start],
                              jnp.asarray([committed], jnp.int32))
        committed = int(start)
        chain = module.sample_chain(state, jnp.asarray([S[start]], jnp.int32), jnp.asarray([start], jnp.int32), greedy, keys, 7)
        logits = np.asarray(chain.logits[0])
        want = ref["schedule.draft_logits"][r]
        assert np.abs(logits[:, keep] - want[:, keep]).max() <= 3e-5 * np.abs(want).max()
        assert np.all(np.isneginf(logits[:, dropped]))
        assert np.abs(np.asarray(chain.hidden[0]) - ref["schedule.draft_hidden"][r]).max() <= 3e-5 * 23
        assert np.asarray(chain.tokens[0]).tolist() == ref["schedule.draft_tokens"][r].tolist()
    # greedy decoding with it is still the target's own (golden plain greedy)
    plain = meta["plain_greedy"]
    result = dj.generate(target, draft, [p["prompt"] for p in plain], max_new_tokens=48, stop_token_ids=[])
    for i, p in enumerate(plain):
        assert result.tokens[i] == p["output_ids"][len(p["prompt"]) :]


def test_reduced_layout_refusals(golden, tmp_path):
    ref, _, _ = golden
    keep = _subset(ref)
    norms = ("midlayer.self_attn.q_norm.weight", "midlayer.self_attn.k_norm.weight")
    with pytest.raises(ConfigError, match="q_norm"):  # a Llama decoder layer: not expressible with Qwen3 blocks
        dj.load_draft(_reduced_layout(tmp_path / "llama", keep, drop=norms))
    with pytest.raises(ConfigError, match="eagle_aux_hidden_state_layer_ids"):
        dj.load_draft(_reduced_layout(tmp_path / "ids", keep, config_edits={"eagle_config": {}}))
    with pytest.raises(ConfigError, match="norm_before_residual"):
        dj.load_draft(_reduced_layout(tmp_path / "nbr", keep, config_edits={"norm_before_residual": True}))
    bad = (keep - np.arange(len(keep))).astype(np.int64)
    bad[1] = keep[0] - 1  # draft tokens 0 and 1 map to the same target token
    with pytest.raises(CheckpointError, match="same target token"):
        dj.load_draft(_reduced_layout(tmp_path / "d2t", keep, d2t=bad))
    with pytest.raises(CheckpointError, match="embed_tokens"):
        dj.load_draft(_reduced_layout(tmp_path / "emb", keep, drop=("embed_tokens.weight",)))


def test_deepspec_layout_refusals(tmp_path):
    def variant(name, **edits):
        d = tmp_path / name
        shutil.copytree(GOLDEN / "draft", d)
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(edits)
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    with pytest.raises(ConfigError, match="exactly 5"):
        dj.load_draft(variant("three", target_layer_ids=[1, 3, 5]))
    with pytest.raises(ConfigError, match="exactly one decoder layer"):
        dj.load_draft(variant("two", num_hidden_layers=2, draft_num_hidden_layers=2))
    with pytest.raises(ConfigError, match="id -1"):
        dj.load_draft(variant("emb", target_layer_ids=[-1, 1, 2, 4, 5]))
    with pytest.raises(ConfigError, match="reduced draft vocabulary"):
        dj.load_draft(variant("vocab", draft_vocab_size=64))
    with pytest.raises(ConfigError, match="Gemma4Eagle3Model"):
        dj.load_draft(variant("gemma", architectures=["Gemma4Eagle3Model"]))
    draft = dj.load_draft(variant("last", target_layer_ids=[1, 2, 4, 5, 7]), dtype="float32")
    target = dj.load_target(GOLDEN / "target", dtype="float32")
    with pytest.raises(ConfigError, match="last layer"):
        dj.check_pair(target, draft)
    with pytest.raises(ConfigError, match="8-layer target"):
        dj.check_pair(dj.Target.random(CFG), draft)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_round_trip(tmp_path, dtype):
    """Export in the reference layout, load back: identical parameters and the golden draft's key set."""
    cfg = se.config_for(CFG, target_layer_ids=IDS)
    draft = se.random_draft(random_target(), cfg, seed=7)
    out = eagle3_checkpoint.export_draft(draft, tmp_path / "e3", dtype=dtype, base_config={"model_type": "qwen3"})
    back = dj.load_draft(out, dtype=dtype)
    got = back.config
    assert (got.target_layer_ids, got.draft_length, got.num_target_layers, got.layout) == (IDS, 7, 6, "deepspec")
    assert got.layer.hidden_size == 64 and got.layer.num_kv_heads == 4 and not got.reduced_vocab
    theirs = dict(nnx.to_flat_state(back.params))
    for path, var in nnx.to_flat_state(draft.params):
        want = np.asarray(jnp.asarray(var.get_value(), dtype)).astype(np.float32)
        assert np.array_equal(np.asarray(theirs[path].get_value()).astype(np.float32), want), path
    golden_keys = set(load_file(GOLDEN / "draft" / "model.safetensors"))
    assert set(load_file(out / "model.safetensors")) == golden_keys
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["Qwen3Eagle3Model"] and written["ttt_length"] == 7
