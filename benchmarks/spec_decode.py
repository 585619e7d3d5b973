"""Speculative vs autoregressive decoding on a memory-bound target, in one run, arms interleaved (benchmarks.md).

Arms, each at batch 1 and 8, temperature 0, K = 7:
* `ar` / `oracle`: plain decoding and speculative decoding of `synthetic.bigram_target` (random weights whose
  greedy continuation follows a permutation; it costs what a random model of its shape costs) with
  `synthetic.oracle_draft` (its Markov head encodes that permutation: tau = K + 1 at temperature 0).
* `ar_random` / `random`: plain and speculative decoding of a fully random target (`dj.Target.random`) with
  `synthetic.random_draft` (untrained: tau ~ 1, the worst-case overhead of speculating).

Target: the ~207M-parameter Qwen3 of `ar_decode.py` (fp32, untied head). Draft: the reference's shape scaled
down (`synthetic.draft_config_for`: one target-shaped layer, 5 feature layers, Markov rank 128, confidence
head, its own copy of the LM head).

Every arm runs the library's compiled whole-generation loop (`decode.generate_loop` / `spec.generate_loop`,
what `dj.generate` calls) with one fixed cache capacity for all arms and budgets, so long and short runs of an
arm execute the same program: a step (or round) costs (t_long - t_short) / (iterations_long - iterations_short),
prefill cancels (the short run is prefill plus at most one step or round). `rho` = spec wall per round / AR wall per step (same target). `rho_ideal` = (one target pass
over K + 1 tokens with feature capture and logits + one draft block pass: `block_hidden` + `base_logits`), each
a jitted function timed alone in the same run, over the AR step time. Engine efficiency = rho_ideal / rho.
Further pieces (draft context update, the whole `propose` with its Markov loop, a one-token target pass) are
timed the same way to show where a round's time goes.

    python benchmarks/spec_decode.py
    python benchmarks/spec_decode.py --batch-sizes 1 --repetitions 5
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import dspark_jax as dj  # noqa: E402
from dspark_jax.engine import decode, generation, spec  # noqa: E402
from dspark_jax.testing import synthetic  # noqa: E402
from dspark_jax.tools import bench  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from ar_decode import CONFIG  # noqa: E402

RESULTS = Path(__file__).parent / "results"
K = 7
MARKOV_RANK = 128
# (long, short) new-token budgets per arm (the short run is prefill plus one step or round); every arm runs
# with cache room for CAPACITY_NEW new tokens, so long and short runs of an arm are one compiled program.
CAPACITY_NEW = 512
BUDGETS = {"ar": (65, 1), "ar_random": (65, 1), "oracle": (257, 1), "random": (33, 1)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def requests(target, prompts, n):
    req, _, _ = generation.build_requests(
        target, prompts, max_new_tokens=n, temperature=0.0, top_k=0, top_p=1.0, seed=0, stop_token_ids=[],
        confidence_threshold=0.0,
    )
    return req


def loop_arm(target, draft, prompts, n):
    """A call of the compiled whole-generation loop; -> (tokens generated per row, loop iterations, tau)."""
    req = requests(target, prompts, n)
    T = req.tokens.shape[1]
    shapes = {"capacity": T + CAPACITY_NEW + K + 1, "out_len": CAPACITY_NEW + K + 1}

    def compile_s():
        if draft is None:
            return bench.compile_seconds(decode.generate_loop, target.graphdef, target.params, req, **shapes)
        return bench.compile_seconds(spec.generate_loop, target.graphdef, target.params, draft.graphdef, draft.params, req, K=K,
                                     **shapes)

    def call():
        if draft is None:
            out, count = decode.generate_loop(target.graphdef, target.params, req, **shapes)
            return {"count": count, "iterations": jnp.max(count) - 1}
        state = spec.generate_loop(target.graphdef, target.params, draft.graphdef, draft.params, req, K=K, **shapes)
        acc = jnp.where(jnp.arange(state.acceptance_lengths.shape[1])[None] < state.rounds[:, None], state.acceptance_lengths, 0)
        return {"count": state.count, "iterations": jnp.max(state.rounds), "accepted_tokens": jnp.sum(acc),
                "rounds": jnp.sum(state.rounds)}

    call.compile_seconds = compile_s
    return call


# ---------------------------------------------------------------------------- pieces of a round, timed alone


@functools.partial(jax.jit, static_argnames=("graphdef", "capture"), donate_argnames=("cache",))
def target_pass(graphdef, params, tokens, lengths, cache, *, capture):
    """Target forward over `tokens [B, T]` with feature capture, plus fp32 logits `[B, T, V]`."""
    model = nnx.merge(graphdef, params)
    hidden, cache, features = model(tokens, lengths, cache, capture=capture)
    return model.logits(hidden), cache, features


@functools.partial(jax.jit, static_argnames=("graphdef", "K"))
def draft_block_pass(graphdef, params, block, lengths, cache, *, K):
    """Draft block forward: `block_hidden` of `[anchor, MASK...]` and base logits of its first K positions."""
    draft = nnx.merge(graphdef, params)
    return draft.base_logits(draft.block_hidden(block, lengths, cache)[:, :K])


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def draft_context_pass(graphdef, params, features, lengths, cache):
    """Draft context update: project K + 1 verified features and write their K/V."""
    return nnx.merge(graphdef, params).extend_context(features, lengths, cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "K"))
def propose_pass(graphdef, params, pending, lengths, cache, sampling_params, keys, *, K):
    """The whole proposal of a round: block pass, sequential Markov loop with sampling, confidence."""
    return spec.propose(nnx.merge(graphdef, params), pending, lengths, cache, sampling_params, keys, K).drafts


def piece_arms(target, draft, B, prompt_len, seed):
    """Zero-argument callables timing the pieces of one round at a committed length of prompt + 64."""
    rng = np.random.default_rng(seed)
    V = target.config.vocab_size
    T = prompt_len
    capacity = T + CAPACITY_NEW + K + 1
    lengths = jnp.full((B,), T + 64, jnp.int32)
    capture = draft.config.hidden_state_indices
    target_cache = {"c": target.module.init_cache(B, capacity)}
    draft_cache = {"c": draft.module.init_cache(B, capacity)}
    verify_ids = jnp.asarray(rng.integers(0, V, (B, K + 1)), jnp.int32)
    one_id = verify_ids[:, :1]
    block = jnp.concatenate([verify_ids[:, :1], jnp.full((B, draft.config.block_size - 1), draft.config.mask_token_id, jnp.int32)], 1)
    features = jnp.asarray(rng.standard_normal((B, K + 1, len(capture) * target.config.hidden_size)), target.dtype)
    req = requests(target, verify_ids.tolist(), 8)

    def run_target(ids):
        logits, target_cache["c"], feats = target_pass(target.graphdef, target.params, ids, lengths, target_cache["c"], capture=capture)
        return logits, feats

    def run_context():
        draft_cache["c"] = draft_context_pass(draft.graphdef, draft.params, features, lengths, draft_cache["c"])
        return draft_cache["c"]

    return {
        "target_1": lambda: run_target(one_id)[0],
        "target_verify": lambda: run_target(verify_ids),
        "draft_block": lambda: draft_block_pass(draft.graphdef, draft.params, block, lengths, draft_cache["c"], K=K),
        "draft_context": run_context,
        "propose": lambda: propose_pass(draft.graphdef, draft.params, verify_ids[:, 0], lengths, draft_cache["c"], req.sampling,
                                        req.keys, K=K),
    }


# ------------------------------------------------------------------------------------------------- main


def per_repetition(t, name, B):
    """Per repetition: seconds per loop iteration and decode tokens/s of an arm (its long minus its short run)."""
    long, short = t[f"{name}_long"], t[f"{name}_short"]
    iterations = int(long.result["iterations"]) - int(short.result["iterations"])
    tokens = int(jnp.sum(long.result["count"][:B])) - int(jnp.sum(short.result["count"][:B]))
    dts = [a - b for a, b in zip(long.times_s, short.times_s, strict=True)]
    return [dt / iterations for dt in dts], [tokens / dt for dt in dts]


def repeated(fn, calls: int):
    """An arm that runs a short piece `calls` times back to back (its time is divided by `calls` afterwards)."""
    def call():
        out = None
        for _ in range(calls):
            out = jax.block_until_ready(fn())
        return out

    return call


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repetitions", type=int, default=5)
    p.add_argument("--piece-calls", type=int, default=5, help="calls of each piece per repetition (their mean is one sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    meta = {"machine": bench.machine(), "target_config": CONFIG.__dict__ | {"rope": CONFIG.rope.__dict__}, "dtype": "float32",
            "K": K, "temperature": 0.0, "repetitions": args.repetitions, "piece_calls": args.piece_calls,
            "prompt_len": args.prompt_len, "budgets": BUDGETS, "capacity_new_tokens": CAPACITY_NEW,
            "prompts": f"uniform random token ids (seed {args.seed}), all rows the same length"}
    log(f"machine: {meta['machine']['cpu_model']} x{meta['machine']['cpu_cores']}, load {meta['machine']['load_average']}")
    successor = synthetic.random_permutation_successor(CONFIG.vocab_size, args.seed)
    draft_cfg = synthetic.draft_config_for(CONFIG, num_layers=1, block_size=K, markov_rank=MARKOV_RANK, confidence=True)
    bigram = synthetic.bigram_target(CONFIG, successor=successor, seed=args.seed)
    oracle = synthetic.oracle_draft(bigram, draft_cfg, successor, seed=args.seed)
    random_target = dj.Target.random(CONFIG, seed=args.seed + 1)
    random_draft = synthetic.random_draft(random_target, draft_cfg, seed=args.seed + 1)
    meta["draft_config"] = draft_cfg.__dict__ | {"rope": draft_cfg.rope.__dict__}
    meta["target_params"] = bigram.num_params
    meta["draft_params"] = oracle.num_params
    embed = CONFIG.vocab_size * CONFIG.hidden_size
    meta["target_weight_bytes_per_step"] = (bigram.num_params - embed) * 4
    meta["draft_weight_bytes_per_round"] = (oracle.num_params - embed) * 4
    log(f"target {bigram.num_params / 1e6:.1f}M params, draft {oracle.num_params / 1e6:.1f}M params")

    med = statistics.median
    reps = range(args.repetitions)
    rows = []
    for B in batch_sizes:
        prompts = np.random.default_rng(args.seed + B).integers(0, CONFIG.vocab_size, (B, args.prompt_len)).tolist()
        pairs = {"ar": (bigram, None), "oracle": (bigram, oracle), "ar_random": (random_target, None), "random": (random_target, random_draft)}
        arms = {}
        for name, (target, draft) in pairs.items():
            n_long, n_short = BUDGETS[name]
            arms[f"{name}_long"] = loop_arm(target, draft, prompts, n_long)
            arms[f"{name}_short"] = loop_arm(target, draft, prompts, n_short)
        compile_s = {name: arms[f"{name}_long"].compile_seconds() for name in pairs}  # ahead of time, before the arms run
        # The pieces of a round join the same interleaved repetitions, so they see the same machine load.
        pieces = {f"piece_{k}": repeated(v, args.piece_calls) for k, v in piece_arms(bigram, oracle, B, args.prompt_len, args.seed).items()}
        pieces |= {f"piece_{k}_random": repeated(v, args.piece_calls)
                   for k, v in piece_arms(random_target, random_draft, B, args.prompt_len, args.seed).items()}
        log(f"batch {B}: compile s {compile_s}; loops and pieces, {args.repetitions} interleaved repetitions")
        t = bench.interleave(arms | pieces, args.repetitions, log=log)

        for spec_arm, ar_arm, suffix in (("oracle", "ar", ""), ("random", "ar_random", "_random")):
            ar_step, ar_tok_s = per_repetition(t, ar_arm, B)
            round_s, spec_tok_s = per_repetition(t, spec_arm, B)
            res = t[f"{spec_arm}_long"].result
            tau = int(res["accepted_tokens"]) / int(res["rounds"])
            names = ("target_1", "target_verify", "draft_block", "draft_context", "propose")
            pc = {n: [x / args.piece_calls for x in t[f"piece_{n}{suffix}"].times_s] for n in names}
            ideal = [pc["target_verify"][i] + pc["draft_block"][i] for i in reps]
            # Every necessary piece: verify + the whole proposal (block pass, Markov loop, confidence) + context update.
            full = [pc["target_verify"][i] + pc["propose"][i] + pc["draft_context"][i] for i in reps]
            rho = [round_s[i] / ar_step[i] for i in reps]
            rho_ideal = [ideal[i] / ar_step[i] for i in reps]
            row = {
                "arm": spec_arm, "batch": B, "tau": tau, "ar_step_ms": 1e3 * med(ar_step), "spec_round_ms": 1e3 * med(round_s),
                "ar_tok_s": med(ar_tok_s), "spec_tok_s": med(spec_tok_s),
                "speedup": med([spec_tok_s[i] / ar_tok_s[i] for i in reps]),
                "rho": med(rho), "rho_ideal": med(rho_ideal),
                "engine_efficiency": med([rho_ideal[i] / rho[i] for i in reps]),
                "rho_ideal_standalone": med([ideal[i] / pc["target_1"][i] for i in reps]),
                "rho_pieces": med([full[i] / ar_step[i] for i in reps]),
                "efficiency_vs_pieces": med([full[i] / round_s[i] for i in reps]),
                "speedup_bar": 0.8 * (K + 1) / med(rho_ideal) if spec_arm == "oracle" else None,
                "ar_end_to_end_tok_s": float(jnp.sum(t[f"{ar_arm}_long"].result["count"][:B])) / t[f"{ar_arm}_long"].median_s,
                "spec_end_to_end_tok_s": float(jnp.sum(res["count"][:B])) / t[f"{spec_arm}_long"].median_s,
                "ar_compile_s": compile_s[ar_arm], "spec_compile_s": compile_s[spec_arm],
                "pieces_ms": {n: 1e3 * med(v) for n, v in pc.items()},
                "per_repetition": {"ar_step_s": ar_step, "round_s": round_s, "rho": rho, "rho_ideal": rho_ideal,
                                   "pieces_s": pc},
                "timings": {k: t[k].summary() for k in (f"{spec_arm}_long", f"{spec_arm}_short", f"{ar_arm}_long", f"{ar_arm}_short")},
                "iterations": {k: int(t[k].result["iterations"]) for k in (f"{spec_arm}_long", f"{spec_arm}_short", f"{ar_arm}_long", f"{ar_arm}_short")},
            }
            rows.append(row)
            log(f"  {spec_arm} B={B}: tau {tau:.2f} rho {row['rho']:.3f} rho_ideal {row['rho_ideal']:.3f} "
                f"efficiency {row['engine_efficiency']:.3f} speedup {row['speedup']:.2f}")
    meta["load_average_end"] = list(os.getloadavg())

    table = bench.Table(
        f"Speculative vs AR decode (fp32, K={K}, temperature 0, same run, interleaved)",
        ["arm", "batch", "tau", "AR tok/s", "spec tok/s", "speedup", "rho", "rho_ideal", "efficiency", "0.8(K+1)/rho_ideal",
         "rho_ideal standalone", "AR step ms", "round ms", "AR compile s", "spec compile s"],
        [[r["arm"], r["batch"], r["tau"], r["ar_tok_s"], r["spec_tok_s"], r["speedup"], r["rho"], r["rho_ideal"],
          r["engine_efficiency"], r["speedup_bar"], r["rho_ideal_standalone"], r["ar_step_ms"], r["spec_round_ms"], r["ar_compile_s"],
          r["spec_compile_s"]]
         for r in rows],
        note=("medians over repetitions of per-repetition values. tok/s of the decode loop ((tokens_long - tokens_short) / "
              "(t_long - t_short), prefill cancels); speedup = spec tok/s / AR tok/s of the same target; rho = round time / AR step "
              "time; rho_ideal = (target pass over K+1 tokens + draft block pass, each jitted and timed alone in the same "
              "repetitions) / AR step time; efficiency = rho_ideal / rho; rho_ideal standalone divides by a one-token target pass "
              "timed alone instead of the loop's AR step."),
    )
    piece_table = bench.Table(
        "Where a round's time goes (ms, medians; jitted pieces timed alone at a committed length of prompt + 64)",
        ["arm", "batch", "AR step (loop)", "target 1 token", "target K+1 verify", "draft block", "draft context update",
         "propose (block+Markov)", "round (loop)", "round - verify - propose - context", "rho_pieces", "pieces / round"],
        [[r["arm"], r["batch"], r["ar_step_ms"], r["pieces_ms"]["target_1"], r["pieces_ms"]["target_verify"], r["pieces_ms"]["draft_block"],
          r["pieces_ms"]["draft_context"], r["pieces_ms"]["propose"], r["spec_round_ms"],
          r["spec_round_ms"] - r["pieces_ms"]["target_verify"] - r["pieces_ms"]["propose"] - r["pieces_ms"]["draft_context"],
          r["rho_pieces"], r["efficiency_vs_pieces"]]
         for r in rows],
        note="rho_pieces = (verify + propose + context update) / AR step: every necessary piece of a round timed alone; "
             "pieces / round = that sum over the measured round time (what fusing the pieces into one loop adds or saves).",
    )
    figure = Path(args.out) / "spec_decode.png"
    plt = bench._pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    labels = [f"{r['arm']} B={r['batch']}" for r in rows]
    x = np.arange(len(rows))
    axes[0].bar(x - 0.2, [r["ar_tok_s"] for r in rows], 0.4, label="AR")
    axes[0].bar(x + 0.2, [r["spec_tok_s"] for r in rows], 0.4, label="speculative")
    axes[0].set_xticks(x, labels)
    axes[0].set_ylabel("decode tokens/s")
    axes[0].set_title(f"tokens/s ({bigram.num_params / 1e6:.0f}M target, K={K})")
    axes[0].legend()
    axes[1].bar(x - 0.2, [r["rho"] for r in rows], 0.4, label="rho (measured)")
    axes[1].bar(x + 0.2, [r["rho_ideal"] for r in rows], 0.4, label="rho_ideal (pieces)")
    axes[1].set_xticks(x, labels)
    axes[1].set_ylabel("round cost / AR step cost")
    axes[1].set_title("round cost")
    axes[1].legend()
    bench.save_figure(fig, figure)
    json_path, md_path = bench.write_report(
        args.out, "spec_decode", title="Speculative decoding engine: oracle and random drafts vs AR",
        tables=[table, piece_table], meta=meta, data={"rows": rows}, figures=[figure],
        intro=f"Target {bigram.num_params / 1e6:.1f}M params (bigram target for AR/oracle, random target for AR_random/random), "
              f"draft {oracle.num_params / 1e6:.1f}M params (1 layer, Markov rank {MARKOV_RANK}, confidence head); "
              f"{meta['machine']['cpu_model']} ({meta['machine']['cpu_cores']} cores), jax {meta['machine']['versions']['jax']}; "
              f"load average {meta['machine']['load_average'][0]:.1f} at start, {meta['load_average_end'][0]:.1f} at end; "
              f"{args.repetitions} interleaved repetitions (pieces: mean of {args.piece_calls} calls per repetition).",
    )
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
