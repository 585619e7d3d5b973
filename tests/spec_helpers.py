"""Shared pieces of the losslessness tests: the greedy arms (random / oracle / mixed drafts) with their plain
greedy outputs, and for sampling the exact processed target distribution of the first STEPS generated tokens
(transformers forward + transformers' own logits warpers) and empirical histograms."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

V = 8
PROMPT = [1, 5, 2, 6]
STEPS = 3
SETTINGS = [dict(temperature=1.0, top_k=0, top_p=1.0), dict(temperature=0.7, top_k=5, top_p=0.9)]


def greedy_arms(random_target, bigram_target, draft_cfg, successor) -> dict:
    """name -> (target, draft): a random draft on a random target (tau ~ 1), and on a bigram target following
    `successor` an oracle draft (tau = K + 1) and one right 60% of the time (partial acceptances)."""
    from dspark_jax.testing import synthetic

    return {
        "random": (random_target, synthetic.random_draft(random_target, draft_cfg, seed=2)),
        "oracle": (bigram_target, synthetic.oracle_draft(bigram_target, draft_cfg, successor)),
        "mixed": (bigram_target, synthetic.oracle_draft(bigram_target, draft_cfg, successor, accuracy=0.6, seed=3)),
    }


def plain_greedy(arms: dict, prompts, max_new_tokens: int) -> dict:
    """name -> plain (draft-free) greedy tokens of each arm's target, no stop tokens."""
    import dspark_jax as dj

    return {name: dj.generate(t, None, prompts, max_new_tokens=max_new_tokens, stop_token_ids=[]).tokens
            for name, (t, _) in arms.items()}


def exact_distribution(hf, setting) -> np.ndarray:
    """P(y1, y2, y3 | prompt) under the processed target distribution, as a [V, V, V] array."""
    warpers = []
    if setting["temperature"] != 1.0:
        warpers.append(TemperatureLogitsWarper(setting["temperature"]))
    if setting["top_k"]:
        warpers.append(TopKLogitsWarper(setting["top_k"]))
    if setting["top_p"] < 1.0:
        warpers.append(TopPLogitsWarper(setting["top_p"]))
    prefixes = np.array([PROMPT + [a, b] for a, b in itertools.product(range(V), range(V))])
    with torch.no_grad():
        logits = hf(torch.as_tensor(prefixes)).logits[:, len(PROMPT) - 1 :, :]  # [V*V, 3, V]
    probs = []
    for step in range(STEPS):
        x = logits[:, step, :].clone()
        for w in warpers:
            x = w(torch.as_tensor(prefixes[:, : len(PROMPT) + step]), x)
        probs.append(torch.softmax(x, dim=-1).numpy().reshape(V, V, V))
    p1 = probs[0][0, 0]  # independent of (a, b)
    p2 = probs[1][:, 0, :]  # [y1, y2]
    p3 = probs[2]  # [y1, y2, y3]
    return p1[:, None, None] * p2[:, :, None] * p3


def empirical(tokens) -> np.ndarray:
    counts = np.zeros(V**STEPS)
    idx = np.array([t[0] * V * V + t[1] * V + t[2] for t in tokens])
    np.add.at(counts, idx, 1)
    return counts / counts.sum()
