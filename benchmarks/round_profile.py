"""Where a speculative round's time goes (issue 17, "a lean round"): each piece of `spec.step` compiled and
timed alone on the built-in pair, in multiples of a plain AR step at the same batch size.

Pieces (the named scopes of `spec.step` / `DSparkDraft.sample_block`): the draft's block forward
(`draft_block`), the whole proposal: block forward plus the sequential Markov loop with sampling and confidence
(`propose`; the loop alone is `propose - draft_block`), the target's
forward over the anchor and K drafts (`target_forward`), the target's processed distributions
(`target_probs`, the top-k/top-p sort included only when a row filters), rejection sampling (`accept`), the
proposer's context extension (`extend`), and the whole fixed round. `target_probs`, `accept` and `extend` each
include the target forward they need (so `target_probs - target_forward` is the distributions' cost, and so on);
`propose` includes `draft_block`. The AR step is `decode`'s one-token step
(forward, distribution, exact sample). State: after prefilling held-out prompts. Pieces run interleaved,
`--repetitions` times each, medians; greedy by default (`--temperature`, `--top-p` to see sampling costs).

    python benchmarks/round_profile.py --batch-sizes 1,16 --out benchmarks/results/round_profile_after
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

RESULTS = Path(__file__).resolve().parent / "results"
PIECES = ("ar_step", "draft_block", "propose", "target_forward", "target_probs", "accept", "extend", "round")


@functools.partial(jax.jit, static_argnames=("tg", "pg", "piece", "K", "capacity"))
def _piece(tg, tp, pg, pp, state, *, piece, K, capacity):
    from flax import nnx

    from dspark_jax.engine import sampling, spec
    from dspark_jax.engine.verify import verify

    target, proposer = nnx.merge(tg, tp), nnx.merge(pg, pp)
    req = state.req
    B = state.pending.shape[0]
    if piece == "round":
        return spec.step(target, proposer, state, K, capacity).lengths
    if piece == "ar_step":
        hidden, _, _ = target(state.pending[:, None], state.lengths, state.target_cache)
        probs = sampling.probabilities(target.logits(hidden[:, 0]), req.sampling)
        return sampling.sample(sampling.step_keys(req.keys, sampling.SALT_TOKEN, state.lengths), probs)
    block = jnp.concatenate([state.pending[:, None], jnp.full((B, K - 1), proposer.config.mask_token_id, jnp.int32)], axis=1)
    if piece == "draft_block":
        hidden = proposer.block_hidden(block, state.lengths, state.proposer_state)
        return proposer.base_logits(hidden)[..., :1]
    if piece == "propose":  # block forward + Markov loop (sampling, confidence); the loop = propose - draft_block
        drafts, probs, _, conf = proposer.sample_block(state.proposer_state, state.pending, state.lengths, req.sampling,
                                                       req.keys, K)
        return drafts
    ids = jnp.concatenate([state.pending[:, None], block[:, 1:], block[:, :1]], axis=1)  # [B, K + 1]
    if piece == "target_forward":
        hidden, _, features = target(ids, state.lengths, state.target_cache, capture=proposer.feature_indices)
        return hidden[..., :1]
    hidden, _, features = jax.lax.stop_gradient(
        target(ids, state.lengths, state.target_cache, capture=proposer.feature_indices))
    if piece == "extend":
        return jax.tree.leaves(proposer.extend(state.proposer_state, ids, features, state.lengths))[0][..., :1]
    logits = target.logits(hidden)
    if piece == "target_probs":
        return sampling.probabilities(logits, req.sampling)[..., :1]
    p = sampling.probabilities(logits, req.sampling)
    return verify(ids[:, 1:], p[:, :K], p, jnp.full((B,), K, jnp.int32), req.stop_ids, req.keys, state.lengths)[1]


def run(batch_sizes, repetitions, K, temperature, top_p):
    import dspark_jax as dj
    from dspark_jax.engine import generation, spec
    from dspark_jax.tools import bench

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from schedule import prompts_heldout

    target, draft = dj.load_target(dtype="float32"), dj.load_draft(dtype="float32")
    out = {}
    for B in batch_sizes:
        prompts = prompts_heldout(target, B)
        req, _, shapes = generation.build_requests(
            target, prompts, max_new_tokens=128, temperature=temperature, top_k=0, top_p=top_p, seed=0,
            stop_token_ids=[], confidence_threshold=0.0, extra_capacity=K)
        state = spec.start_jit(target.graphdef, target.params, draft.graphdef, draft.params, req, K=K, **shapes)
        args = (target.graphdef, target.params, draft.graphdef, draft.params, state)

        calls = {piece: functools.partial(_piece, *args, piece=piece, K=K, capacity=shapes["capacity"]) for piece in PIECES}
        med = {p: t.median_s for p, t in bench.interleave(calls, repetitions).items()}
        out[B] = {"ms": {p: 1e3 * v for p, v in med.items()}, "x_ar": {p: v / med["ar_step"] for p, v in med.items()}}
        print(f"batch {B}: " + ", ".join(f"{p} {out[B]['x_ar'][p]:.2f}x" for p in PIECES), file=sys.stderr, flush=True)
    return out


def greedy_path_ab(batch_sizes, repetitions, K):
    """The lean greedy path against the general one, in one process: the round and the AR step at temperature 0
    (every row greedy: one-hot distributions, no uniforms, no sampler walk) and at temperature 1e-4 (just above
    the greedy threshold: the general path, which is what greedy rows paid before the lean change), interleaved.
    -> per batch: round / AR step for each path."""
    import dspark_jax as dj
    from dspark_jax.engine import generation, spec
    from dspark_jax.tools import bench

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from schedule import prompts_heldout

    target, draft = dj.load_target(dtype="float32"), dj.load_draft(dtype="float32")
    out = {}
    for B in batch_sizes:
        prompts = prompts_heldout(target, B)
        calls = {}
        for name, temp in (("lean", 0.0), ("general", 1e-4)):
            req, _, shapes = generation.build_requests(
                target, prompts, max_new_tokens=128, temperature=temp, top_k=0, top_p=1.0, seed=0,
                stop_token_ids=[], confidence_threshold=0.0, extra_capacity=K)
            state = spec.start_jit(target.graphdef, target.params, draft.graphdef, draft.params, req, K=K, **shapes)
            for piece in ("ar_step", "round"):
                calls[(name, piece)] = functools.partial(_piece, target.graphdef, target.params, draft.graphdef,
                                                         draft.params, state, piece=piece, K=K, capacity=shapes["capacity"])
        med = {k: t.median_s for k, t in bench.interleave(calls, repetitions).items()}
        out[B] = {"ms": {f"{a} {b}": 1e3 * v for (a, b), v in med.items()},
                  "round_x_ar": {name: med[(name, "round")] / med[(name, "ar_step")] for name in ("lean", "general")},
                  "round_x_general_ar": {name: med[(name, "round")] / med[("general", "ar_step")] for name in ("lean", "general")}}
        print(f"batch {B}: {json.dumps(out[B])}", file=sys.stderr, flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--repetitions", type=int, default=30)
    parser.add_argument("--draft-length", type=int, default=7)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--out", default=str(RESULTS / "round_profile"))
    args = parser.parse_args(argv)
    from dspark_jax.tools import bench

    load = os.getloadavg()
    res = run([int(x) for x in args.batch_sizes.split(",")], args.repetitions, args.draft_length, args.temperature, args.top_p)
    data = {"machine": bench.machine(), "load_before": load, "load_after": os.getloadavg(),
            "args": {k: v for k, v in vars(args).items() if k != "out"}, "results": res}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    lines = [f"# Round cost breakdown (multiples of one AR step; temperature {args.temperature}, top-p {args.top_p})\n",
             f"Built-in pair, float32, K={args.draft_length}, {args.repetitions} interleaved repetitions, medians; load average "
             f"{load[0]:.1f} before / {data['load_after'][0]:.1f} after (shared 2-core machine).\n",
             "| batch | AR step (ms) | " + " | ".join(PIECES[1:]) + " |", "|" + "---|" * (len(PIECES) + 1)]
    for B, r in res.items():
        lines.append(f"| {B} | {r['ms']['ar_step']:.2f} | " + " | ".join(f"{r['x_ar'][p]:.2f}" for p in PIECES[1:]) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
