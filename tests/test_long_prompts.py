"""Chunked prefill: a prompt runs through the target in fixed-size chunks inside the compiled program.

Chunked equals unchunked (Qwen3 with AR, DSpark and prompt-lookup decoding; Gemma 4 with sliding-window ring
buffers smaller than a chunk and KV sharing), and a prompt of several chunks generates exactly what
transformers generates greedily. Memory and speed at 2k-16k tokens: benchmarks/long_prompt.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_models import qwen3

import dspark_jax as dj
from dspark_jax.engine.generation import prompt_bucket
from dspark_jax.testing import synthetic


def test_prompt_buckets_are_chunk_multiples():
    assert prompt_bucket(5, 512) == 16
    assert prompt_bucket(300, 512) == 512
    assert prompt_bucket(513, 512) == 1024
    assert prompt_bucket(8193, 512) == 8704  # not 16384: buckets above one chunk do not double
    assert prompt_bucket(16000, 512) == 16384


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen3_long")
    hf = qwen3(directory, seed=11, max_position_embeddings=1024)
    return hf, dj.load_target(directory, dtype="float32")


def test_several_chunks_generate_what_transformers_generates(hf_pair):
    hf, target = hf_pair
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, target.config.vocab_size, n).tolist() for n in (231, 40)]
    ours = dj.generate(target, None, prompts, max_new_tokens=16, stop_token_ids=[], prefill_chunk=32)
    for prompt, tokens in zip(prompts, ours.tokens):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, min_new_tokens=16)
        assert tokens == out[0, len(prompt):].tolist()


def test_chunked_equals_unchunked_for_every_proposer(hf_pair):
    _, target = hf_pair
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, target.config.vocab_size, n).tolist() for n in (150, 17, 1, 64)]
    draft = synthetic.random_draft(target, synthetic.draft_config_for(target.config, markov_rank=16), seed=2)
    for proposer in (None, draft, dj.prompt_lookup()):
        # fixed rounds: the rounds themselves are compared, and under "auto" they are planned per batch
        kwargs = dict(max_new_tokens=12, stop_token_ids=[], temperature=0.8, seed=3, schedule="fixed")
        whole = dj.generate(target, proposer, prompts, prefill_chunk=256, **kwargs)
        chunked = dj.generate(target, proposer, prompts, prefill_chunk=16, **kwargs)
        assert chunked.tokens == whole.tokens
        assert chunked.stats.acceptance_lengths == whole.stats.acceptance_lengths
    pieces = [[] for _ in prompts]
    for fresh in dj.stream(target, draft, prompts, prefill_chunk=16, **kwargs):
        for row, new in zip(pieces, fresh):
            row.extend(new)
    assert pieces == dj.generate(target, draft, prompts, prefill_chunk=256, **kwargs).tokens


def test_gemma4_rings_and_kv_sharing_across_chunks():
    from test_gemma4_spec import DRAFT_CFG, random_target

    target = random_target()
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, target.config.vocab_size, n).tolist() for n in (70, 9, 33)]
    draft = synthetic.random_draft(target, DRAFT_CFG, seed=5)
    for proposer in (None, draft):
        whole = dj.generate(target, proposer, prompts, max_new_tokens=10, stop_token_ids=[], prefill_chunk=128)
        chunked = dj.generate(target, proposer, prompts, max_new_tokens=10, stop_token_ids=[], prefill_chunk=16)
        assert chunked.tokens == whole.tokens  # window 4 < chunk 16: every chunk crosses the sliding window
