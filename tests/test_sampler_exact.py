"""The sampler is exact at a real vocabulary size (V = 151,936, Qwen3's).

A designed distribution puts most mass on a few tokens and spreads the rest over tiers of tiny probabilities
(about 1e-6, 1e-8, 1e-10 and 1e-30), scattered through the vocabulary, with exact zeros in between. Checks:

* reachability, no randomness: for every token with p > 0, uniforms chosen from an independent numpy float32
  replica of the two sum trees make `lookup` return exactly that token, and zero-probability tokens are never
  returned, even for extreme uniforms;
* thresholds: at every level of a path, `lookup` switches branch exactly at the float32 ratio the replica
  computes, so with `P(u < s) = s` (tested on the uniforms' bit patterns and on keyed draws) the replica's
  product of ratios *is* the lookup's probability of each token; it matches `p / sum(p)` (float64) within a
  relative 1e-5 for every token, where the one-uniform CDF sampler it replaced, enumerated over all its
  2**23 uniforms, is off by a TV of ~2e-3 and cannot draw tens of thousands of tokens;
* distribution: 2**20 keyed draws through `sample`, binned by tier and vocabulary range: chi-square p > 1e-4,
  TV within the 99.9th percentile of an exact multinomial sampler of the same size (the noise floor);
* speculative acceptance: `verify` accepts a draft with probability `min(1, q/p)` even for p < 1e-8.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scistats

from dspark_jax.engine import sampling, verify

V = 151_936
N = 2**20
CHUNK = 2**14
BELOW_ONE = np.nextafter(np.float32(1), np.float32(0))
TIERS = {"1e-6": (80_000, 1e-6), "1e-8": (50_000, 1e-8), "1e-10": (10_000, 1e-10), "1e-30": (100, 1e-30)}


def designed_distribution() -> tuple[np.ndarray, dict]:
    """float32 probabilities over V summing to ~1 -> (p, token ids of each group)."""
    rng = np.random.default_rng(0)
    p = np.zeros(V, np.float64)
    big = np.array([3, 17, 1000, 60_000, V - 1])
    p[big] = [0.31, 0.2, 0.15, 0.1, 0.05]
    order = rng.permutation(np.setdiff1d(np.arange(V), big))
    groups, start = {"big": big}, 0
    for name, (count, value) in TIERS.items():
        groups[name] = order[start : start + count]
        p[groups[name]] = value * rng.uniform(0.5, 1.5, count)
        start += count
    # the remaining 11,831 tokens stay at exactly 0
    p /= p.sum()
    return p.astype(np.float32), groups


@pytest.fixture(scope="module")
def design():
    return designed_distribution()


def exact(p: np.ndarray) -> np.ndarray:
    return p.astype(np.float64) / p.astype(np.float64).sum()


# --------------------------------------------------------------------------- numpy replica of the two trees


def np_tree(leaves: np.ndarray) -> list[np.ndarray]:
    """Pairwise float32 sum tree along the last axis, leaves first."""
    levels = [leaves.astype(np.float32)]
    while levels[-1].shape[-1] > 1:
        x = levels[-1]
        levels.append((x[..., 0::2] + x[..., 1::2]).astype(np.float32))
    return levels


def replica(p: np.ndarray):
    """-> (in-block trees [NB, C] levels, block-mass tree levels, (C, NB, NBp))."""
    C, NB, NBp = sampling.layout(V)
    x = np.zeros(NB * C, np.float32)
    x[:V] = p
    inner = np_tree(x.reshape(NB, C))
    masses = np.zeros(NBp, np.float32)
    masses[:NB] = inner[-1][:, 0]
    return inner, np_tree(masses), (C, NB, NBp)


def path_steps(levels: list[np.ndarray], leaf: np.ndarray):
    """Per level from the root: (ratio lighter / (L + R) in float32, whether the path enters the lighter child).
    `levels` are one tree's levels (leading axes broadcast against `leaf`)."""
    depth = len(levels) - 1
    for d in range(depth):
        level = levels[depth - 1 - d]
        node = leaf >> (depth - d)
        left = np.take_along_axis(level, (2 * node)[..., None], -1)[..., 0] if level.ndim > 1 else level[2 * node]
        right = np.take_along_axis(level, (2 * node + 1)[..., None], -1)[..., 0] if level.ndim > 1 else level[2 * node + 1]
        want_left = ((leaf >> (depth - d - 1)) & 1) == 0
        left_lighter = left <= right
        with np.errstate(invalid="ignore"):
            ratio = (np.where(left_lighter, left, right) / (left + right)).astype(np.float32)
        yield ratio, want_left == left_lighter


def steering_uniforms(p: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each token: uniforms that lead the lookup to it (half the ratio to enter the lighter child, the largest
    float32 below 1 to enter the heavier one), the ratios met on the way, and whether each step enters the
    lighter child. -> (u, ratios, lighter), each `[n, depth]`."""
    inner, outer, (C, NB, NBp) = replica(p)
    block, within = tokens // C, tokens % C
    steps = list(path_steps(outer, block))
    rows = [level[block] for level in inner]  # each token's own block tree
    steps += list(path_steps(rows, within))
    ratios = np.stack([r for r, _ in steps], 1)
    lighter = np.stack([w for _, w in steps], 1)
    return np.where(lighter, ratios / 2, BELOW_ONE).astype(np.float32), ratios, lighter


def lookup_many(p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """`sampling.lookup` of one row for many uniform vectors (vmapped: the trees are built once)."""
    probs = jnp.asarray(p)[None]
    find = jax.jit(jax.vmap(lambda uu: sampling.lookup(probs, uu[None])[0]))
    return np.concatenate([np.asarray(find(jnp.asarray(u[i : i + CHUNK]))) for i in range(0, len(u), CHUNK)])


def test_every_token_with_positive_probability_is_reachable(design):
    p, _ = design
    tokens = np.nonzero(p > 0)[0]
    assert len(tokens) == 140_105 and 0 < p[tokens].min() < 1e-29
    u, _, _ = steering_uniforms(p, tokens)
    assert u.shape == (len(tokens), sampling.num_uniforms(V)) and np.all((u > 0) & (u < 1))
    got = lookup_many(p, u)
    wrong = np.nonzero(got != tokens)[0]
    assert len(wrong) == 0, f"{len(wrong)} tokens not reached, e.g. {tokens[wrong[:5]]} -> {got[wrong[:5]]}"


def test_zero_probability_tokens_are_never_returned(design):
    p, _ = design
    keys = sampling.row_keys(jnp.full(CHUNK, 7, jnp.uint32), jnp.arange(CHUNK, dtype=jnp.uint32))
    u = np.array(sampling.uniforms(keys, sampling.num_uniforms(V)))
    u[:64] = np.float32(2.0**-65)  # the smallest uniform: always the lighter child, never a zero one
    u[64:128] = BELOW_ONE
    u[128:1024, ::2] = np.float32(2.0**-65)
    assert np.all(p[lookup_many(p, u)] > 0)
    one_hot = np.zeros((3, V), np.float32)
    one_hot[[0, 1, 2], [0, 77_777, V - 1]] = 1.0
    assert np.asarray(sampling.sample(keys[:3], jnp.asarray(one_hot))).tolist() == [0, 77_777, V - 1]


def test_decisions_switch_exactly_at_the_float32_ratios(design):
    """At each level, u = ratio goes to the heavier child and the float32 just below it to the lighter one."""
    p, groups = design
    rng = np.random.default_rng(3)
    tokens = np.concatenate([groups["big"]] + [rng.choice(groups[name], 40, replace=False) for name in TIERS])
    u, ratios, lighter = steering_uniforms(p, tokens)
    depth = u.shape[1]
    cases, expect = [], []
    for level in range(depth):
        for below in (True, False):
            v = u.copy()
            v[:, level] = np.nextafter(ratios[:, level], np.float32(0)) if below else ratios[:, level]
            cases.append(v)
            # the path is unchanged iff the token lies on the side the boundary uniform selects
            expect.append(lighter[:, level] == below)
    got = lookup_many(p, np.concatenate(cases)).reshape(len(cases), len(tokens))
    positive = ratios > 0  # a zero lighter child has no "just below"
    for i, (level, below) in enumerate((lv, b) for lv in range(depth) for b in (True, False)):
        same = got[i] == tokens
        check = positive[:, level]
        assert np.array_equal(same[check], expect[i][check]), f"level {level}, below={below}"


def test_lookup_probabilities_equal_the_distribution(design):
    """Each token's probability under `lookup` is the product of its path's decisions, each taken with
    probability `ratio` (lighter) or `1 - ratio` (heavier), given P(u < s) = s (`test_unit_floats_*`)."""
    p, _ = design
    tokens = np.arange(V)
    _, ratios, lighter = steering_uniforms(p, tokens)
    r = ratios.astype(np.float64)
    # below a zero node both children are zero (ratio 0/0): the path already took a step of probability 0
    prob = np.prod(np.nan_to_num(np.where(lighter, r, 1.0 - r), nan=0.0), axis=1)
    ex = exact(p)
    assert np.all(prob[p == 0] == 0)
    rel = np.abs(prob[p > 0] / ex[p > 0] - 1)
    assert rel.max() < 1e-5, f"max relative error {rel.max():.2e}"
    ours_tv = 0.5 * np.abs(prob - ex).sum()
    assert ours_tv < 1e-6

    # The sampler it replaced, enumerated over all 2**23 values of its uniform: far from exact.
    cdf = np.asarray(jnp.cumsum(jnp.asarray(p)[None], axis=-1))[0]
    x = (np.arange(2**23, dtype=np.float32) * np.float32(2.0**-23)) * cdf[-1]
    old = np.bincount(np.minimum(np.searchsorted(np.sort(cdf), x, side="right"), V - 1), minlength=V) / 2**23
    old_tv = 0.5 * np.abs(old - ex).sum()
    assert old_tv > 1e-3 > 1000 * ours_tv
    assert np.sum((p > 0) & (old == 0)) > 10_000


# ------------------------------------------------------------------------------------------------ uniforms


def test_unit_floats_have_full_precision_near_zero():
    def u(m, hi, lo):
        return float(sampling.unit_floats(jnp.asarray([[m << 9, hi, lo]], jnp.uint32))[0])

    assert u(0, 1 << 31, 0) == 0.5
    assert u((1 << 23) - 1, 0xFFFFFFFF, 0) == float(BELOW_ONE)
    assert u(0, 1 << 30, 0) == 0.25
    assert u(1 << 22, 1, 0) == 1.5 * 2.0**-32
    assert u(0, 0, 1 << 31) == 2.0**-33
    assert u(0, 0, 1) == 2.0**-64
    assert u(0, 0, 0) == 2.0**-65
    keys = sampling.row_keys(jnp.zeros(64, jnp.uint32), jnp.arange(64, dtype=jnp.uint32))
    x = np.asarray(sampling.uniforms(keys, 2**14)).ravel().astype(np.float64)  # 2**20 draws
    n = x.size
    for s in (0.5, 0.1, 1e-2, 1e-3, 1e-4):
        assert abs((x < s).sum() - n * s) < 5 * np.sqrt(n * s * (1 - s)) + 1, s
    assert x.min() > 0 and x.max() < 1
    # below 2**-10 the values are finer than jax.random.uniform's grid of multiples of 2**-23
    small = x[x < 2.0**-10] * 2.0**23
    assert len(small) > 900 and np.mean(small != np.round(small)) > 0.9


# -------------------------------------------------------------------------------------------- distribution


def bins(groups: dict) -> list[np.ndarray]:
    """Each large token alone; the 1e-6 and 1e-8 tiers in 16 vocabulary ranges each; the 1e-10 and 1e-30 tiers
    (expected ~1 draw in all) pooled with the last 1e-8 range so every bin expects >= 5 draws."""
    out = [np.array([i]) for i in groups["big"]]
    for name in ("1e-6", "1e-8"):
        out += np.array_split(np.sort(groups[name]), 16)
    out[-1] = np.concatenate([out[-1], groups["1e-10"], groups["1e-30"]])
    return out


def test_draws_match_the_distribution_at_real_vocabulary_size(design):
    p, groups = design
    probs = jnp.asarray(p)[None]
    draw = jax.jit(jax.vmap(lambda k: sampling.sample(k[None], probs)[0]))
    tokens = []
    for c in range(N // CHUNK):
        rows = jnp.arange(c * CHUNK, (c + 1) * CHUNK, dtype=jnp.uint32)
        keys = sampling.step_keys(sampling.row_keys(jnp.full(CHUNK, 11, jnp.uint32), rows), sampling.SALT_TOKEN,
                                  jnp.full(CHUNK, 5, jnp.int32))
        tokens.append(np.asarray(draw(keys)))
    counts = np.bincount(np.concatenate(tokens), minlength=V)
    assert counts[p == 0].sum() == 0
    ex = exact(p)
    b = bins(groups)
    observed = np.array([counts[i].sum() for i in b], np.float64)
    expected = np.array([ex[i].sum() for i in b]) * N
    assert expected.min() >= 5 and observed.sum() == N
    pvalue = scistats.chisquare(observed, expected).pvalue
    assert pvalue > 1e-4, f"chi-square p = {pvalue:.2e}"
    tv = 0.5 * np.abs(observed - expected).sum() / N
    rng = np.random.default_rng(1)
    floor = np.quantile([0.5 * np.abs(rng.multinomial(N, expected / N) - expected).sum() / N for _ in range(400)], 0.999)
    assert tv <= floor, f"binned TV {tv:.2e} above the noise floor of an exact sampler {floor:.2e}"
    tier = counts[groups["1e-8"]].sum()
    assert abs(tier - ex[groups["1e-8"]].sum() * N) < 5 * np.sqrt(ex[groups["1e-8"]].sum() * N)


# ---------------------------------------------------------------------------------------------- acceptance


def test_acceptance_keeps_exact_odds_for_tiny_draft_probabilities():
    """A draft with p_d = 1e-9 and p_t = 5e-10 passes half of the time (the reference's 1e-8 floor on p_d would
    make it 5%); with p_t >= p_d it always passes; a rejection draws from the residual."""
    n, Vs = 2**14, 8
    p_d = np.zeros((n, 1, Vs), np.float32)
    p_d[:, 0, 0], p_d[:, 0, 1] = 1e-9, 1.0 - 1e-9
    p_t = np.zeros((n, 2, Vs), np.float32)
    p_t[:, 0, 0], p_t[:, 0, 2] = 5e-10, 1.0 - 5e-10
    p_t[:, 1, 3] = 1.0
    drafts = jnp.zeros((n, 1), jnp.int32)
    keys = sampling.row_keys(jnp.zeros(n, jnp.uint32), jnp.arange(n, dtype=jnp.uint32))
    run = functools.partial(verify.verify, num_proposed=jnp.ones(n, jnp.int32), stop_ids=jnp.full((n, 1), -1, jnp.int32),
                            row_keys=keys, lengths=jnp.full(n, 3, jnp.int32))
    accepted, nxt, _ = (np.asarray(x) for x in run(drafts, jnp.asarray(p_d), jnp.asarray(p_t)))
    rate = accepted.mean()
    assert abs(rate - 0.5) < 5 * np.sqrt(0.25 / n), rate
    assert np.all(nxt[accepted == 0] == 2) and np.all(nxt[accepted == 1] == 3)
    p_t[:, 0, 0], p_t[:, 0, 2] = 2e-9, 1.0 - 2e-9
    accepted, _, _ = run(drafts, jnp.asarray(p_d), jnp.asarray(p_t))
    assert np.all(np.asarray(accepted) == 1)
