"""Logits processing and sampling, per row and fully traced.

`probabilities` turns logits into the distribution a row samples from: greedy rows (temperature below
`GREEDY_TEMPERATURE`, the reference's threshold) get the one-hot of the first argmax; others get temperature
scaling, then top-k, then top-p (HF logits-warper order and semantics; tokens tied with the last kept value are
kept). The same function produces the draft and the target distributions of speculative decoding, so the
acceptance ratio always compares the two distributions that are actually sampled from.

`sample` draws a token from a row's distribution exactly at any vocabulary size (docs/algorithm.md §3.5):
every token with `p > 0` is reachable, and its probability of being drawn equals `p / sum(p)` up to float32
rounding of the ratios involved (a relative error of about 1e-6), however small `p` is relative to the rest.

`token_at` is the one place a row's token at an absolute position is drawn, under the request's sampler
(`SamplingParams.sampler`, docs/algorithm.md §3.6): "rejection" draws with `sample` from a key of the call
site's role; "coupled" takes the argmax of the log-probabilities plus Gumbel noise keyed by (row, position)
alone, so every caller (plain decoding, a draft, verification) that reaches the same position with the same
distribution picks the same token.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from dspark_jax.config import SamplingParams

# Fixed salts so each random role of a row draws an independent stream.
SALT_TOKEN = 1
SALT_DRAFT = 2
SALT_ACCEPT = 3
SALT_RESIDUAL = 4
SALT_COUPLED = 5  # the coupled sampler's per-position noise (shared by every role)

SAMPLERS = ("coupled", "rejection")

# Temperatures below this are greedy (docs/algorithm.md §3.4): dividing logits by a tiny positive temperature
# overflows to inf and gives NaN probabilities.
GREEDY_TEMPERATURE = 1e-5


def _per_row(x: jax.Array, ndim: int) -> jax.Array:
    return x.reshape(x.shape + (1,) * (ndim - 1))


def _filter(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Mask (to -inf) what top-k and then top-p remove from temperature-scaled logits `[B, ..., V]`."""
    V = scaled.shape[-1]
    ordered = -jnp.sort(-scaled, axis=-1)  # descending
    k = _per_row(jnp.where((top_k > 0) & (top_k < V), top_k, V), scaled.ndim)
    rank = jnp.arange(V)
    ordered = jnp.where(rank < k, ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    top_p = _per_row(top_p, scaled.ndim)
    # rows without a nucleus filter keep everything, even tail tokens whose cumulative mass rounds to 1
    keep = ((mass_before < top_p) | (top_p >= 1)) & (rank < k)
    keep = keep.at[..., 0].set(True)
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def is_greedy(temperature: jax.Array) -> jax.Array:
    return temperature < GREEDY_TEMPERATURE


def all_greedy(params: SamplingParams) -> jax.Array:
    """Whether every row of the batch decodes greedily (a scalar; lets a round skip work no row needs)."""
    return jnp.all(is_greedy(params.temperature))


def probabilities(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """fp32 distribution `[B, ..., V]` from logits `[B, ..., V]` under each row's sampling settings.

    When every row is greedy only the one-hot rows are built (no softmax, no filter); the result is the same."""
    logits = logits.astype(jnp.float32)
    one_hot = lambda x: jax.nn.one_hot(jnp.argmax(x, axis=-1), x.shape[-1], dtype=jnp.float32)  # noqa: E731
    return lax.cond(all_greedy(params), one_hot, lambda x: _probabilities(x, params), logits)


def _probabilities(logits: jax.Array, params: SamplingParams) -> jax.Array:
    nd = logits.ndim
    temperature = _per_row(params.temperature, nd)
    greedy = is_greedy(temperature)
    scaled = logits / jnp.where(greedy, 1.0, temperature)
    needs_filter = jnp.any(((params.top_k > 0) | (params.top_p < 1)) & ~is_greedy(params.temperature))
    scaled = jax.lax.cond(needs_filter, lambda s: _filter(s, params.top_k, params.top_p), lambda s: s, scaled)
    sampled = jax.nn.softmax(scaled, axis=-1)
    one_hot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jnp.where(greedy, one_hot, sampled)


# ---------------------------------------------------------------------------------------------- uniforms


def unit_floats(bits: jax.Array) -> jax.Array:
    """Uniforms in (0, 1) from `bits u32[..., 3]`, with full relative precision near 0.

    The mantissa is 23 random bits and the binade `[2^-e, 2^-e+1)` is chosen with probability `2^-e` from the
    leading zeros of 64 more bits, so `P(u < s) = s` holds exactly for every float32 `s` in `[2^-64, 1]`
    (docs/algorithm.md §3.5). `jax.random.uniform` instead returns multiples of `2^-23`, which makes every
    event rarer than that (a tiny token, a tiny acceptance ratio) come out with the wrong probability.
    """
    bits = bits.astype(jnp.uint32)
    mantissa = bits[..., 0] >> 9
    hi, lo = bits[..., 1], bits[..., 2]
    e = jnp.where(hi != 0, lax.clz(hi) + 1, jnp.where(lo != 0, lax.clz(lo) + 33, jnp.uint32(65)))
    return lax.bitcast_convert_type(((jnp.uint32(127) - e) << 23) | mantissa, jnp.float32)


def uniforms(keys: jax.Array, n: int) -> jax.Array:
    """`[B, n]` full-precision uniforms (`unit_floats`), row `b` from `keys[b]` only."""
    return unit_floats(jax.vmap(lambda k: jax.random.bits(k, (n, 3), jnp.uint32))(keys))


# ---------------------------------------------------------------------------------------------- sampling


def layout(V: int) -> tuple[int, int, int]:
    """Two-level split of a vocabulary: (block size C, blocks NB = ceil(V / C), NB padded to a power of two).

    C is the power of two at or above sqrt(V): 512 blocks of 512 slots (297 used) for V = 151,936."""
    C = 1 << math.isqrt(V - 1).bit_length()  # ceil(sqrt(V)) rounded up to a power of two
    NB = -(-V // C)
    return C, NB, 1 << max(0, (NB - 1).bit_length())


def num_uniforms(V: int) -> int:
    """Uniforms one draw over a vocabulary of `V` consumes (one per level of the two sum trees)."""
    C, _, NBp = layout(V)
    return (NBp.bit_length() - 1) + (C.bit_length() - 1)


def _halve(x: jax.Array) -> jax.Array:
    """One level of a pairwise sum tree along the last axis: node `i` = fl(x[2i] + x[2i+1])."""
    return x[..., 0::2] + x[..., 1::2]


def _tree(leaves: jax.Array) -> list[jax.Array]:
    """All levels of the pairwise sum tree over `leaves [B, 2^d]`, from the leaves to the root `[B, 1]`."""
    levels = [leaves]
    while levels[-1].shape[-1] > 1:
        levels.append(_halve(levels[-1]))
    return levels


def _descend(levels: list[jax.Array], u: jax.Array) -> jax.Array:
    """Walk a sum tree from the root with one uniform per level. -> leaf index `[B]`.

    At a node with children masses `L`, `R` the walk goes to the lighter child iff `u < min(L, R) / (L + R)`,
    so each step is taken with the exact float32 ratio, whichever side is tiny (a zero child is never entered).
    `L + R` is the parent as the tree stored it, so the ratios along a path telescope to `leaf / root`.
    """
    node = jnp.zeros(u.shape[:1], jnp.int32)
    for depth, level in enumerate(reversed(levels[:-1])):
        pair = jnp.take_along_axis(level, 2 * node[:, None] + jnp.arange(2)[None, :], axis=-1)
        left, right = pair[:, 0], pair[:, 1]
        left_lighter = left <= right
        ratio = jnp.where(left_lighter, left, right) / (left + right)
        go_left = (u[:, depth] < ratio) == left_lighter
        node = 2 * node + jnp.where(go_left, 0, 1)
    return node


def lookup(probs: jax.Array, u: jax.Array) -> jax.Array:
    """The token of each row of `probs [B, V]` (non-negative, possibly unnormalised) chosen by the uniforms
    `u [B, num_uniforms(V)]`: a block of the vocabulary from the block masses, then a token inside it.

    Both levels are walks down pairwise sum trees (`_descend`); the block masses are the roots of the
    in-block trees, computed by the same additions, so `P(token) = p / sum(p)` up to float32 rounding of the
    ratios. A row of zeros returns `V - 1`.
    """
    B, V = probs.shape
    C, NB, NBp = layout(V)
    x = jnp.pad(probs.astype(jnp.float32), ((0, 0), (0, NB * C - V))).reshape(B, NB, C)
    masses = jnp.pad(_tree(x)[-1][..., 0], ((0, 0), (0, NBp - NB)))  # the roots of the in-block trees
    d1 = NBp.bit_length() - 1
    block = _descend(_tree(masses), u[:, :d1])
    row = jnp.take_along_axis(x, block[:, None, None], axis=1)[:, 0]
    within = _descend(_tree(row), u[:, d1:])
    return jnp.minimum(block * C + within, V - 1).astype(jnp.int32)


def draw(keys: jax.Array, probs: jax.Array, greedy: jax.Array) -> jax.Array:
    """`sample`, or when `greedy` (a scalar: every row's `probs` is one-hot) the position of each row's 1,
    which is what `sample` returns for a one-hot row, without drawing uniforms."""
    return lax.cond(greedy, lambda k, p: jnp.argmax(p, axis=-1).astype(jnp.int32), sample, keys, probs)


def sample(keys: jax.Array, probs: jax.Array) -> jax.Array:
    """One token per row from (possibly unnormalised) `probs [B, V]` with per-row `keys [B]`.

    Exact at any vocabulary size (docs/algorithm.md §3.5): `lookup` with `num_uniforms(V)` full-precision
    uniforms per row (18 at V = 151,936), so randomness stays one key per (row, role, position).
    """
    return lookup(probs, uniforms(keys, num_uniforms(probs.shape[-1])))


def step_keys(row_keys: jax.Array, salt: int, step: jax.Array) -> jax.Array:
    """Per-row keys for one random role at a per-row step (usually the row's position)."""
    return jax.vmap(lambda k, s: jax.random.fold_in(jax.random.fold_in(k, salt), s))(row_keys, step)


def row_keys(seeds: jax.Array, rows: jax.Array) -> jax.Array:
    """Row `i`'s key derives from `(seed_i, row_i)` only, never from its batch mates."""
    return jax.vmap(lambda s, r: jax.random.fold_in(jax.random.key(s), r))(seeds, rows)


# ---------------------------------------------------------------------------------------------- coupled


def _mix(x: jax.Array) -> jax.Array:
    """A bijective avalanche of uint32 words (xor-shift-multiply rounds)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _noise_bits(key: jax.Array, V: int) -> jax.Array:
    """`u32[V, 3]` words for one (row, position): four words drawn from the key seed a keyed bijection of the
    token index (`_mix` rounds), and three words per token derive from it. A threefry draw of `3 V` words
    costs ~25x more on XLA:CPU (docs/algorithm.md §3.6)."""
    seed = jax.random.bits(key, (4,), jnp.uint32)
    base = _mix(_mix(jnp.arange(V, dtype=jnp.uint32) ^ seed[0]) + seed[1])
    return jnp.stack([_mix(base ^ seed[2]), _mix(base + seed[3]), _mix(_mix(base) ^ (seed[2] + seed[3]))], axis=-1)


def gumbel_noise(keys: jax.Array, V: int) -> jax.Array:
    """Standard Gumbel noise `[N, V]`, row `n` from `keys[n]` only: `-log(E)` with `E = -log1p(-u)` an
    exponential variate from a full-precision uniform (`unit_floats`), so small `E` (a rare token winning)
    keeps its exact odds down to `2^-64`."""
    u = unit_floats(jax.vmap(lambda k: _noise_bits(k, V))(keys))
    return -jnp.log(-jnp.log1p(-u))


def coupled_keys(row_keys: jax.Array, positions: jax.Array) -> jax.Array:
    """Keys `[B, ...]` of the coupled noise at absolute `positions [B, ...]` of each row."""
    def per_row(key, at):
        return jax.vmap(lambda q: jax.random.fold_in(jax.random.fold_in(key, SALT_COUPLED), q))(at)

    flat = jax.vmap(per_row)(row_keys, positions.reshape(positions.shape[0], -1))
    return flat.reshape(positions.shape)


def coupled(probs: jax.Array, row_keys: jax.Array, positions: jax.Array) -> jax.Array:
    """Gumbel-max tokens `[B, ...]` of `probs [B, ..., V]` at absolute `positions [B, ...]`: the argmax of
    `log p + G`, `G` the noise of (row, position). An exact draw from `p / sum(p)` (a token with `p = 0` never
    wins), and the same token for any two distributions that are equal at that position."""
    V = probs.shape[-1]
    keys = coupled_keys(row_keys, positions).reshape(-1)
    noise = gumbel_noise(keys, V).reshape(probs.shape)
    return first_argmax(jnp.log(probs.astype(jnp.float32)) + noise)


def first_argmax(x: jax.Array) -> jax.Array:
    """`argmax` over the last axis (the first maximal index) as a max and a min: XLA:CPU runs `jnp.argmax`'s
    two-operand reduction ~4x slower when the noise computation fuses into it."""
    top = jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(jnp.where(x == top, jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape[-1]), axis=-1)


def token_at(probs: jax.Array, params: SamplingParams, row_keys: jax.Array, positions: jax.Array, salt: int,
             greedy: jax.Array | None = None) -> jax.Array:
    """Each row's token at absolute `positions [B]` from `probs [B, V]` under the request's sampler: "coupled"
    (`coupled`, the same noise whoever draws) or "rejection" (`sample` keyed by the role's `salt` and the
    position). `greedy` (a scalar: every row is one-hot) skips the noise; the token is the same."""
    if params.sampler == "coupled":
        fn = lambda p: coupled(p, row_keys, positions)  # noqa: E731
        if greedy is None:
            return fn(probs)
        return lax.cond(greedy, lambda p: jnp.argmax(p, axis=-1).astype(jnp.int32), fn, probs)
    keys = step_keys(row_keys, salt, positions)
    return sample(keys, probs) if greedy is None else draw(keys, probs, greedy)
