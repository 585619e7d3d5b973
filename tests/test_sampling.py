"""Logits processing against transformers' warpers, sampled AR decoding against the processed target
distribution, and the recompilation contract of plain decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_models import qwen3
from scipy import stats as scistats
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import dspark_jax as dj
from dspark_jax.config import SamplingParams
from dspark_jax.engine import decode, sampling

SETTINGS = [
    dict(temperature=1.0, top_k=0, top_p=1.0),
    dict(temperature=0.6, top_k=0, top_p=1.0),
    dict(temperature=1.0, top_k=3, top_p=1.0),
    dict(temperature=0.8, top_k=0, top_p=0.7),
    dict(temperature=1.3, top_k=6, top_p=0.85),
]


def hf_processed(logits: np.ndarray, s: dict) -> np.ndarray:
    x = torch.as_tensor(logits)
    ids = torch.zeros((x.shape[0], 1), dtype=torch.long)
    if s["temperature"] != 1.0:
        x = TemperatureLogitsWarper(s["temperature"])(ids, x)
    if s["top_k"]:
        x = TopKLogitsWarper(s["top_k"])(ids, x)
    if s["top_p"] < 1.0:
        x = TopPLogitsWarper(s["top_p"])(ids, x)
    return torch.softmax(x, -1).numpy()


def test_probabilities_match_transformers_warpers():
    logits = np.random.default_rng(0).normal(0, 2.5, (len(SETTINGS), 40)).astype(np.float32)
    params = SamplingParams.create(
        len(SETTINGS), **{k: [s[k] for s in SETTINGS] for k in ("temperature", "top_k", "top_p")}
    )
    ours = np.asarray(sampling.probabilities(logits, params))
    for i, s in enumerate(SETTINGS):
        np.testing.assert_allclose(ours[i], hf_processed(logits[i : i + 1], s)[0], atol=1e-6)
    greedy = np.asarray(sampling.probabilities(logits, SamplingParams.create(len(SETTINGS))))
    assert np.array_equal(greedy, np.eye(40)[logits.argmax(-1)])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("v10")
    hf = qwen3(directory, seed=9, vocab_size=10, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    with torch.no_grad():
        hf.lm_head.weight.mul_(8.0)
    hf.save_pretrained(directory)
    return hf, dj.load_target(directory, dtype="float32")


def test_sampled_tokens_follow_processed_target_distribution(tiny):
    hf, target = tiny
    prompt = [3, 1, 4, 1, 5]
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[:, -1].numpy()
    n = 2**14
    for s in SETTINGS:
        expected = hf_processed(logits, s)[0].astype(np.float64)
        tokens = dj.generate(target, None, [prompt] * n, max_new_tokens=1, stop_token_ids=[], seed=1, **s).tokens
        counts = np.bincount([t[0] for t in tokens], minlength=10)
        assert counts[expected == 0].sum() == 0, f"{s}: sampled a filtered token"
        keep = expected > 0
        tv = 0.5 * np.abs(counts / n - expected).sum()
        assert tv < 0.02, f"{s}: TV {tv:.4f}"
        if keep.sum() > 1:
            # cells expected fewer than 5 times are pooled into one (the chi-square approximation needs it; a
            # single draw in a cell expected 0.02 times, e.g. one flipped at an fp32 CDF boundary, would decide it)
            exp_counts = expected[keep] / expected[keep].sum() * n
            rare = exp_counts < 5
            obs, exp = counts[keep][~rare], exp_counts[~rare]
            if rare.any():
                obs, exp = np.append(obs, counts[keep][rare].sum()), np.append(exp, exp_counts[rare].sum())
            p = scistats.chisquare(obs, exp).pvalue
            assert p > 1e-4, f"{s}: chi-square p={p:.2e}"


def test_no_recompilation_across_sampling_settings_and_seeds(tiny):
    _, target = tiny
    prompts = [[1, 2, 3], [4, 5]]
    before = decode.generate_loop._cache_size()
    for s, seed in zip(SETTINGS, range(len(SETTINGS))):
        dj.generate(target, None, prompts, max_new_tokens=6, stop_token_ids=[], seed=seed, **s)
    dj.generate(target, None, prompts, max_new_tokens=6, stop_token_ids=[])  # greedy
    assert decode.generate_loop._cache_size() - before == 1
