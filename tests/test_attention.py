"""The shared attention (layers/attention.py) against a NumPy softmax written here, for caches longer than
`EXTENT_BLOCK`: streaming a cache block by block to its used extent (docs/caches.md §10) must not change any
output, whatever extent the mask selects, for linear caches, a wrapped ring and a batch whose rows use different
extents."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.layers import kv_cache
from dspark_jax.layers.attention import EXTENT_BLOCK, MAX_BLOCKS, MAX_BLOCKS_OFF_CPU, attention, block_size, full_extent

B, T, N, G, H = 2, 3, 4, 2, 8


def reference(q, parts):
    """Grouped-query softmax attention over the concatenated parts, in float64."""
    q = np.asarray(q, np.float64)
    ks = np.concatenate([np.asarray(k, np.float64) for k, _, _ in parts], axis=1)
    vs = np.concatenate([np.asarray(v, np.float64) for _, v, _ in parts], axis=1)
    mask = np.concatenate([np.asarray(m) for _, _, m in parts], axis=2)
    out = np.zeros(q.shape)
    for n in range(N):
        g = n // (N // G)
        s = np.einsum("bth,bsh->bts", q[:, :, n], ks[:, :, g]) * H**-0.5
        s = np.where(mask, s, -1e30)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, :, n] = np.einsum("bts,bsh->bth", p, vs[:, :, g])
    return out


def cache_layout(part):
    """A token-major part `(k [B, S, G, H], v, mask)` in the cache's heads-major layout `[B, G, S, H]`."""
    k, v, m = part
    return np.swapaxes(k, 1, 2), np.swapaxes(v, 1, 2), m


def random_parts(S, lengths, window=None, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, N, H)).astype(np.float32)
    k = rng.normal(size=(B, S, G, H)).astype(np.float32)
    v = rng.normal(size=(B, S, G, H)).astype(np.float32)
    fk = rng.normal(size=(B, T, G, H)).astype(np.float32)
    fv = rng.normal(size=(B, T, G, H)).astype(np.float32)
    lengths = jnp.asarray(lengths, jnp.int32)
    q_pos = lengths[:, None] + jnp.arange(T)[None, :]
    cached = (k, v, kv_cache.cached_mask(q_pos, lengths, S, window))
    own = (fk, fv, kv_cache.block_mask(B, T, causal=True, window=window))
    return q, cached, own


def test_block_size():
    assert block_size(EXTENT_BLOCK + 1) == EXTENT_BLOCK
    assert block_size(MAX_BLOCKS * EXTENT_BLOCK) == EXTENT_BLOCK
    assert block_size(MAX_BLOCKS * EXTENT_BLOCK + 1) == 2 * EXTENT_BLOCK
    assert block_size(4096, MAX_BLOCKS_OFF_CPU) == 4096 // MAX_BLOCKS_OFF_CPU  # TPU: fewer, larger blocks
    assert block_size(32768) * MAX_BLOCKS >= 32768


@pytest.mark.parametrize("lengths", [(0, 0), (5, 1), (5, EXTENT_BLOCK + 3), (700, 40), (999, 998), (1000, 1000)])
def test_linear_cache_any_extent(lengths):
    S = 1000
    q, cached, own = random_parts(S, lengths)
    got = jax.jit(lambda q, c, o: attention(q, [c], o, H**-0.5))(q, cache_layout(cached), own)
    want = reference(q, [cached, own])
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("lengths", [(0, 0), (700, 40), (2100, 2990), (2999, 2999)])
def test_off_cpu_blocks_any_extent(lengths, monkeypatch):
    """The block policy programs compiled for TPU get (at most MAX_BLOCKS_OFF_CPU blocks: here 3 blocks of 1024 over
    3000 keys, the last one overlapping the one before), run on CPU: exact at every extent."""
    import dspark_jax.layers.attention as attention_module

    monkeypatch.setattr(attention_module, "MAX_BLOCKS", MAX_BLOCKS_OFF_CPU)
    assert block_size(3000) == 1024
    q, cached, own = random_parts(3000, lengths, seed=5)
    got = jax.jit(lambda q, c, o: attention(q, [c], o, H**-0.5))(q, cache_layout(cached), own)
    np.testing.assert_allclose(np.asarray(got), reference(q, [cached, own]), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("lengths", [(100, 20), (600, 900), (5000, 30)])
def test_ring_buffer_wrapped_or_not(lengths):
    """A sliding-window ring of 520 slots (window 512): before it wraps the cut applies; after, every slot."""
    q, cached, own = random_parts(520, lengths, window=512, seed=1)
    got = jax.jit(lambda q, c, o: attention(q, [c], o, H**-0.5))(q, cache_layout(cached), own)
    np.testing.assert_allclose(np.asarray(got), reference(q, [cached, own]), rtol=2e-5, atol=2e-5)


def test_two_cached_parts_of_different_lengths():
    """Several cached parts (a cache and an injected context) share one ladder index and stay exact."""
    q, (k, v, m), own = random_parts(1000, (300, 12), seed=2)
    q2, (k2, v2, m2), _ = random_parts(300, (290, 7), seed=3)
    parts = [(k, v, m), (k2, v2, m2)]
    got = jax.jit(lambda q, p, o: attention(q, p, o, H**-0.5))(q, [cache_layout(p) for p in parts], own)
    np.testing.assert_allclose(np.asarray(got), reference(q, [*parts, own]), rtol=2e-5, atol=2e-5)


def test_rows_in_groups_of_their_own_extent_from_a_stacked_cache():
    """A batch of 19 rows of very different lengths is attended in groups of consecutive rows (each streamed to
    its own extent; on XLA:CPU), reading layer 1 of a stacked heads-major `[3, B, G, S, H]` cache in place: every
    row exact."""
    rng = np.random.default_rng(4)
    b, S = 19, 1000
    # 10 short rows, 5 of the middle ladder step, 4 long ones (one at the very end), shuffled: sorted groups of 3
    # then mix steps, so a group read to anything less than its longest row would lose keys
    spans = [(0, EXTENT_BLOCK - T)] * 10 + [(EXTENT_BLOCK + 10, 2 * EXTENT_BLOCK - T)] * 5 + [(600, S - T)] * 4
    lengths = np.array([rng.integers(lo, hi) for lo, hi in spans])
    lengths[-1] = S - T
    lengths = jnp.asarray(rng.permutation(lengths), jnp.int32)
    q = rng.normal(size=(b, T, N, H)).astype(np.float32)
    ks = rng.normal(size=(3, b, S, G, H)).astype(np.float32)
    vs = rng.normal(size=(3, b, S, G, H)).astype(np.float32)
    own = tuple(rng.normal(size=(b, T, G, H)).astype(np.float32) for _ in range(2))
    q_pos = lengths[:, None] + jnp.arange(T)[None, :]
    mask = kv_cache.cached_mask(q_pos, lengths, S)
    own = (*own, kv_cache.block_mask(b, T, causal=True))

    def f(q, ks, vs, index):
        return attention(q, [(kv_cache.Stacked(ks, index), kv_cache.Stacked(vs, index), mask)], own, H**-0.5)

    got = jax.jit(f)(q, np.swapaxes(ks, 2, 3), np.swapaxes(vs, 2, 3), jnp.int32(1))
    want = np.concatenate([reference(q[i : i + 1], [(ks[1, i : i + 1], vs[1, i : i + 1], mask[i : i + 1]),
                                                      tuple(x[i : i + 1] for x in own)]) for i in range(b)])
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("after", [False, True])
def test_write_layer_stores_the_block_at_each_rows_length_in_place(after):
    """`write_layer` puts row r's block at positions `lengths[r] + t` of layer `index` and nowhere else."""
    rng = np.random.default_rng(5)
    n, b, S = 3, 4, 64
    cache = rng.normal(size=(n, b, S, G, H)).astype(np.float32)
    block = rng.normal(size=(b, T, G, H)).astype(np.float32)
    lengths = np.array([0, 7, S - T, 30], np.int32)
    dep = jnp.ones((b, T, 5)) if after else None
    got = jax.jit(lambda c, x, i: kv_cache.write_layer(kv_cache.Stacked(c, i), x, jnp.asarray(lengths), after=dep))(
        np.swapaxes(cache, 2, 3), block, jnp.int32(2))
    want = cache.copy()
    for r in range(b):
        want[2, r, lengths[r] : lengths[r] + T] = block[r]
    np.testing.assert_array_equal(np.swapaxes(np.asarray(got), 2, 3), want)


def test_full_extent_reads_everything_in_one_softmax_and_is_differentiable():
    """Training reads long parts whole (`full_extent`): the same outputs as the streamed read, and gradients exist
    (the streamed read's key-block loop has a traced trip count, which reverse mode cannot differentiate)."""
    q, cached, own = random_parts(1000, (700, 40), seed=6)
    cached = cache_layout(cached)

    def loss(q):
        return jnp.sum(attention(q, [cached], own, H**-0.5) ** 2)

    with full_extent():
        whole = jax.jit(lambda q: attention(q, [cached], own, H**-0.5))(q)
        grad = jax.jit(jax.grad(loss))(q)
    streamed = jax.jit(lambda q: attention(q, [cached], own, H**-0.5))(q)
    np.testing.assert_allclose(np.asarray(whole), np.asarray(streamed), rtol=2e-5, atol=2e-5)
    assert np.all(np.isfinite(np.asarray(grad))) and np.abs(np.asarray(grad)).max() > 0
    with pytest.raises(ValueError, match="[Rr]everse-mode"):
        jax.jit(jax.grad(loss))(q)
