"""A DSpark draft on a DeepSeek-V3 target is lossless: greedy speculative output equals plain greedy output.

No DSpark draft was released for V3, so the draft is a Qwen3-backbone DSpark draft (the draft family is the
draft's own, docs/algorithm.md §2) reading V3 interior features, on the tiny MLA + MoE target of
tests/test_deepseek_mtp.py: random (tau ~ 1), oracle (every draft accepted) and mixed (right 60% of the time).
"""

from __future__ import annotations

import pytest
from test_deepseek_mtp import PROMPTS, SPEC_CFG, SUCCESSOR, _random_target

import dspark_jax as dj
from dspark_jax.proposers.dspark import DraftConfig
from dspark_jax.testing import synthetic

K = 5
DRAFT_CFG = DraftConfig(
    backbone=dj.Qwen3Config(model_type="qwen3", vocab_size=SPEC_CFG.vocab_size, hidden_size=SPEC_CFG.hidden_size,
                            intermediate_size=128, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                            max_position_embeddings=SPEC_CFG.max_position_embeddings),
    block_size=K, target_layer_ids=(0, 1), num_target_layers=SPEC_CFG.num_layers, mask_token_id=SPEC_CFG.vocab_size - 1,
    markov_rank=32, markov_head_type="vanilla", enable_confidence_head=True, confidence_head_with_markov=True,
)
NEW = 24


@pytest.fixture(scope="module")
def arms():
    bigram = synthetic.bigram_target(SPEC_CFG, successor=SUCCESSOR, seed=1)
    random = _random_target()
    return {
        "random": (random, synthetic.random_draft(random, DRAFT_CFG, seed=2)),
        "oracle": (bigram, synthetic.oracle_draft(bigram, DRAFT_CFG, SUCCESSOR)),
        "mixed": (bigram, synthetic.oracle_draft(bigram, DRAFT_CFG, SUCCESSOR, accuracy=0.6, seed=3)),
    }


@pytest.mark.parametrize("kind", ["random", "oracle", "mixed"])
def test_greedy_speculative_equals_plain_greedy(arms, kind):
    target, draft = arms[kind]
    dj.check_pair(target, draft)
    plain = dj.generate(target, None, PROMPTS, max_new_tokens=NEW, stop_token_ids=[]).tokens
    spec = dj.generate(target, draft, PROMPTS, max_new_tokens=NEW, stop_token_ids=[], schedule="fixed")
    assert spec.tokens == plain
    tau = spec.stats.mean_acceptance_length
    assert {"random": tau < 1.5, "oracle": tau > K, "mixed": 1.2 < tau < K}[kind], tau
