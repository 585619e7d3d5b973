"""Speculative decoding with a Gemma 4 target and a Gemma 4 DSpark draft is lossless.

The target is a tiny Gemma 4 (12B-style geometry: K=V global layers, proportional RoPE, soft-capping) with a
sliding window of 4, shorter than every verify block, and KV sharing; the draft reads interior target
layers, including a KV-sharing one. Greedy speculative output equals plain greedy output token for token
with a random draft, an oracle draft (every draft accepted) and a mixed one, on a ragged batch whose longest
prompt overflows the sliding ring.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import numpy as np
import pytest
from flax import nnx
from spec_helpers import greedy_arms, plain_greedy

import dspark_jax as dj
from dspark_jax.models.gemma4 import FULL, SLIDING, Gemma4Config
from dspark_jax.proposers.dspark import DraftConfig
from dspark_jax.testing import synthetic

WINDOW, K = 4, 7
CFG = Gemma4Config(
    model_type="gemma4_unified",
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_layers=6,
    num_heads=4,
    layer_types=(SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL),
    sliding_window=WINDOW,
    head_dim=16,
    num_kv_heads=2,
    global_head_dim=32,
    num_global_kv_heads=1,
    attention_k_eq_v=True,
    final_logit_softcapping=30.0,
    # Untied so the bigram target below can follow an arbitrary successor map; random and bigram targets
    # then share one compiled program.
    tie_word_embeddings=False,
    max_position_embeddings=512,
    num_kv_shared_layers=2,
)
DRAFT_CFG = DraftConfig(
    # Gemma drafts use the global head geometry in every layer, all full attention, their own head
    backbone=dataclasses.replace(
        CFG, num_layers=1, layer_types=(FULL,), head_dim=CFG.global_head_dim, num_kv_heads=CFG.num_global_kv_heads,
        num_kv_shared_layers=0, tie_word_embeddings=False,
    ),
    block_size=7,
    target_layer_ids=(0, 2, 3, 4),  # interior layers like the 12B draft's [5, 17, 29, 41, 46] of 48; 4 shares KV
    num_target_layers=CFG.num_layers,
    mask_token_id=4,
    markov_rank=32,
    enable_confidence_head=True,
    confidence_head_with_markov=True,
)
SUCCESSOR = synthetic.random_permutation_successor(CFG.vocab_size, seed=5)
PROMPTS = [[3, 9, 27], list(range(40, 53)), [101], list(range(7, 33))]
NEW = 28


def _scaled(target, factor: float, norms: dict[str, float]):
    """Multiply every weight by `factor`, then set norm weights whose name is in `norms` to that value."""
    params = jax.tree.map(lambda x: x * factor, target.params)
    for path, var in nnx.to_flat_state(params):
        name = str(path[-1])
        if "norm" in name or name == "layer_scalar":
            var.set_value(np.full(var.get_value().shape, norms.get(name, 1.0), np.float32))
    return target.with_params(params)


def random_target():
    """Random weights large enough that logits are decisive (greedy far from ties)."""
    return _scaled(dj.Target.random(CFG, seed=0), 0.15 / 0.02, {})


def bigram_target():
    """Greedy continuation follows SUCCESSOR. Gemma re-normalises every sub-block output (sandwich norms),
    so the residual stays close to the token embedding only with small post-norm weights."""
    t = synthetic.bigram_target(CFG, successor=SUCCESSOR, seed=1)
    small = {n: 0.02 for n in ("post_attention_layernorm", "post_feedforward_layernorm")}
    return _scaled(t, 1.0, small)


@pytest.fixture(scope="module")
def models():
    return greedy_arms(random_target(), bigram_target(), DRAFT_CFG, SUCCESSOR)


@pytest.fixture(scope="module")
def plain(models):
    return plain_greedy(models, PROMPTS, NEW)


def test_bigram_target_follows_its_successor_map(models, plain):
    for prompt, out in zip(PROMPTS, plain["oracle"], strict=True):
        seq = [prompt[-1], *out]
        assert all(int(SUCCESSOR[a]) == b for a, b in itertools.pairwise(seq))


@pytest.mark.parametrize("kind", ["random", "oracle", "mixed"])
def test_greedy_speculative_equals_plain_greedy(models, plain, kind):
    target, draft = models[kind]
    result = dj.generate(target, draft, PROMPTS, max_new_tokens=NEW, stop_token_ids=[], draft_length=K, schedule="fixed")
    assert result.tokens == plain[kind]
    assert all(len(t) == NEW for t in result.tokens)
    acceptance = result.stats.acceptance_lengths
    if kind == "oracle":  # every round accepts all K drafts plus the bonus token (budget may cut the last)
        assert all(all(a == K + 1 for a in row[:-1]) for row in acceptance)
    elif kind == "random":
        assert result.stats.mean_acceptance_length < 1.3
    else:  # partial acceptances: rounds commit fewer tokens than they wrote to the sliding rings
        assert any(1 < a < K + 1 for row in acceptance for a in row)


# --- sampled losslessness ------------------------------------------------------------------------------
# The statistical check of test_spec_sampling.py, on a Gemma 4 target built with transformers: the empirical
# distribution of the first three sampled tokens (N independent rows) against the exact distribution from
# transformers' forward over every continuation, processed with transformers' own logits warpers.


@pytest.fixture(scope="module")
def sampling_setup(tmp_path_factory):
    import torch
    import transformers as tf
    from spec_helpers import PROMPT, V

    torch.manual_seed(0)
    text = tf.Gemma4TextConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        global_head_dim=16,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        layer_types=[SLIDING, FULL, SLIDING, FULL],
        sliding_window=2,  # smaller than the verify block, so sampled rounds also cross the window
        num_kv_shared_layers=2,
        hidden_size_per_layer_input=0,
        final_logit_softcapping=30.0,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
    )
    hf = tf.Gemma4ForCausalLM(text).eval()
    with torch.no_grad():  # sharper logits than the default init so the distributions are far from uniform
        hf.model.embed_tokens.weight.mul_(6.0)
    directory = tmp_path_factory.mktemp("gemma4_v8")
    hf.save_pretrained(directory)
    target = dj.load_target(directory, dtype="float32")
    # transformers 5.24 crashes in its prompt-slicing shortcut for KV-sharing layers when a model has KV
    # sharing but no per-layer inputs; asking for hidden states switches the shortcut off.
    hf.config.output_hidden_states = True
    t = target.config
    cfg = dataclasses.replace(
        DRAFT_CFG,
        backbone=dataclasses.replace(
            DRAFT_CFG.backbone, vocab_size=V, hidden_size=32, intermediate_size=48, num_heads=2,
            head_dim=t.global_head_dim, global_head_dim=t.global_head_dim, num_kv_heads=t.num_global_kv_heads,
            num_global_kv_heads=t.num_global_kv_heads, rope_full=t.rope_full,
        ),
        target_layer_ids=(0, 2),
        num_target_layers=4,
        mask_token_id=V - 1,
        markov_rank=8,
    )
    # A draft that roughly knows the target: its Markov head encodes the target's greedy successor of each
    # token after the prompt, for 70% of the tokens, at a strength that keeps its distributions soft.
    with torch.no_grad():
        last = hf(torch.as_tensor([PROMPT + [x] for x in range(V)])).logits[:, -1]
    draft = synthetic.oracle_draft(target, cfg, last.argmax(-1).numpy(), accuracy=0.7, strength=2.0, seed=4)
    return hf, target, draft


def test_speculative_sampling_matches_target(sampling_setup):
    from scipy import stats as scistats
    from spec_helpers import PROMPT, SETTINGS, STEPS, empirical, exact_distribution

    hf, target, draft = sampling_setup
    n = 2**14
    rng = np.random.default_rng(0)
    # Plain sampling with full proposals, and warped sampling with confidence-truncated proposals (the
    # threshold logic is family-independent; test_spec_sampling.py covers every combination on Qwen3).
    for setting, threshold in ((SETTINGS[0], 0.0), (SETTINGS[1], 0.5)):
        exact = exact_distribution(hf, setting).reshape(-1).astype(np.float64)
        exact /= exact.sum()
        noise = np.mean([0.5 * np.abs(rng.multinomial(n, exact) / n - exact).sum() for _ in range(20)])
        result = dj.generate(
            target,
            draft,
            [PROMPT] * n,
            max_new_tokens=STEPS,
            stop_token_ids=[],
            schedule="fixed",  # every draft verified, so the acceptance-rate check below is not vacuous
            draft_length=3,
            confidence_threshold=threshold,
            seed=1 + int(10 * threshold),
            **setting,
        )
        emp = empirical(result.tokens)
        tv = 0.5 * np.abs(emp - exact).sum()
        what = f"{setting} threshold={threshold}"
        assert tv - noise <= 0.01, f"{what}: TV {tv:.4f} vs noise {noise:.4f}"
        assert emp[exact == 0].sum() == 0, f"{what}: sampled a token the processed target excludes"
        common = exact * n >= 5  # chi-square needs expected counts >= 5: pool the rare outcomes
        observed, expected = (
            np.append(emp[common], emp[~common].sum()) * n,
            np.append(exact[common], exact[~common].sum()) * n,
        )
        keep = expected > 0
        assert scistats.chisquare(observed[keep], expected[keep]).pvalue > 1e-4, what
        rate = np.mean([row[0] > 0 for row in result.stats.accepted_draft_lengths])
        assert 0.05 < rate < 0.95, f"{what}: first-draft acceptance rate {rate:.3f} makes the check vacuous"
