"""Qwen3 / Qwen3-MoE targets against transformers on tiny random models (float32, highest precision)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import qwen3

import dspark_jax as dj

TOL = 1e-5
VARIANTS = {
    "dense_untied": dict(),
    "dense_tied": dict(tied=True),
    "moe": dict(moe=True, mlp_only_layers=[1]),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf = qwen3(directory, seed=len(request.param), **VARIANTS[request.param])
    return hf, dj.load_target(directory, dtype="float32"), request.param


def _hf_forward(hf, ids):
    with torch.no_grad():
        return hf(torch.as_tensor(ids, dtype=torch.long), output_hidden_states=True)


def test_prefill_logits_and_every_hidden_state(pair):
    hf, target, name = pair
    rng = np.random.default_rng(1)
    ids = rng.integers(0, target.config.vocab_size, (2, 40))  # crosses YaRN's original 32 positions
    ref = _hf_forward(hf, ids)
    model = target.module
    L = target.config.num_layers
    hidden, _, features = model(
        jnp.asarray(ids, jnp.int32), jnp.zeros(2, jnp.int32), model.init_cache(2, 64), capture=tuple(range(L + 1))
    )
    logits = np.asarray(model.logits(hidden))
    assert np.abs(logits - ref.logits.numpy()).max() <= TOL, name
    ours = np.split(np.asarray(features), L + 1, axis=-1)
    for i in range(L + 1):
        err = np.abs(ours[i] - ref.hidden_states[i].numpy()).max()
        assert err <= TOL, f"{name}: hidden state {i} differs by {err}"


def test_cached_decode_and_blocks_at_per_row_offsets(pair):
    """Prefill ragged prompts, then feed blocks of different lengths at each row's own offset."""
    hf, target, name = pair
    model = target.module
    rng = np.random.default_rng(2)
    full = rng.integers(0, target.config.vocab_size, (2, 30))
    ref = _hf_forward(hf, full).logits.numpy()
    prompt_lens = np.array([7, 12])
    cache = model.init_cache(2, 64)
    tokens = np.zeros((2, 16), np.int32)
    for b in range(2):
        tokens[b, : prompt_lens[b]] = full[b, : prompt_lens[b]]
    hidden, cache, _ = model(jnp.asarray(tokens), jnp.zeros(2, jnp.int32), cache, num_valid=jnp.asarray(prompt_lens))
    logits = np.asarray(model.logits(hidden))
    for b in range(2):
        np.testing.assert_allclose(logits[b, : prompt_lens[b]], ref[b, : prompt_lens[b]], atol=TOL, rtol=0)
    lengths = prompt_lens.copy()
    for T in (1, 5, 1, 3):  # one-token decode and multi-token blocks; rows sit at different offsets
        block = np.stack([full[b, lengths[b] : lengths[b] + T] for b in range(2)]).astype(np.int32)
        hidden, cache, _ = model(jnp.asarray(block), jnp.asarray(lengths, jnp.int32), cache)
        logits = np.asarray(model.logits(hidden))
        for b in range(2):
            err = np.abs(logits[b] - ref[b, lengths[b] : lengths[b] + T]).max()
            assert err <= TOL, f"{name}: block of {T} at offset {lengths[b]} differs by {err}"
        lengths += T


def test_rejected_slots_are_overwritten(pair):
    """Write-ahead: a block written past the committed length and then not committed must not leak."""
    hf, target, name = pair
    model = target.module
    rng = np.random.default_rng(3)
    full = rng.integers(0, target.config.vocab_size, (1, 20))
    ref = _hf_forward(hf, full).logits.numpy()
    cache = model.init_cache(1, 32)
    _, cache, _ = model(jnp.asarray(full[:, :10], jnp.int32), jnp.zeros(1, jnp.int32), cache)
    junk = rng.integers(0, target.config.vocab_size, (1, 6)).astype(np.int32)
    _, cache, _ = model(jnp.asarray(junk), jnp.asarray([10], jnp.int32), cache)  # verified, then rejected
    hidden, _, _ = model(jnp.asarray(full[:, 10:14], jnp.int32), jnp.asarray([10], jnp.int32), cache)
    assert np.abs(np.asarray(model.logits(hidden))[0] - ref[0, 10:14]).max() <= TOL


def test_greedy_generation_equals_transformers(pair):
    hf, target, name = pair
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, target.config.vocab_size, n).tolist() for n in (5, 11, 3)]
    ours = dj.generate(target, None, prompts, max_new_tokens=24, stop_token_ids=[]).tokens
    for prompt, tokens in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, min_new_tokens=24)
        assert tokens == out[0, len(prompt) :].tolist(), name
