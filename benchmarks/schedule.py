"""AR vs fixed-length vs scheduled (`schedule="auto"`) speculative decoding against batch size, on the built-in
pair and on its cost-inflated target (issue 17; docs/algorithm.md §4.5).

Prompts: the held-out half of `assets/heldout_prompts.jsonl` that `dspark-jax calibrate` did not fit on (odd
indices), first turn, chat template; greedy; the built-in DSpark draft (float32). A batch size `B` below
`--min-prompts` (8) runs `ceil(8 / B)` calls of `B` distinct prompts per arm, so that batch 1 times eight
answers, not one answer of a few dozen milliseconds. Per batch size every arm is
warmed up first (compile; for `auto` the verify-cost profile too, cached on disk), then the arms run
interleaved (AR, fixed, auto, AR, ...) `--repetitions` times in this one process; tokens/s = generated
tokens / wall time of the whole `generate` call (prefill included); ratios are medians of per-repetition
ratios. Every arm's output is checked equal to AR's. Also reported: tau, the mean number of drafts verified
per round (`auto`: scheduled), and the share of `auto`'s rounds that ran as plain AR steps.

    python benchmarks/schedule.py --batch-sizes 1,4,16,64 --repetitions 3 --inflate-mb 100
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def prompts_heldout(target, n):
    from dspark_jax import assets
    from dspark_jax.tools import batch

    tok = target.tokenizer
    chosen = batch.read_prompts(assets.ROOT / "heldout_prompts.jsonl").prompts[1::2]
    ids = [tok.encode(batch.prompt_text(p, tok, True), add_special_tokens=False) for p in chosen]
    return [ids[i % len(ids)] for i in range(n)]


def arms(target, draft, groups, new_tokens, K):
    """Each arm runs every group of prompts as one `generate` call (batch = the group's size), in turn."""
    import dspark_jax as dj

    kw = dict(max_new_tokens=new_tokens, draft_length=K)
    run = lambda **a: [dj.generate(target, a.pop("draft", draft), g, **a) for g in groups]
    return {
        "AR": lambda: run(draft=None, max_new_tokens=new_tokens),
        "fixed": lambda: run(schedule="fixed", **kw),
        "auto": lambda: run(schedule="auto", **kw),
    }


def _merged(results):
    """One set of statistics for the calls of an arm: per-prompt lists concatenated."""
    from dspark_jax.engine.generation import GenerationStats

    st = [r.stats for r in results]
    cat = lambda f: [x for s in st for x in getattr(s, f)]
    K = len(st[0].prefix_survival)
    return GenerationStats.from_rounds(cat("acceptance_lengths"), cat("proposal_lengths"), cat("accepted_draft_lengths"),
                                       cat("num_generated"), cat("finish_reasons"), K, sum(s.wall_time_s for s in st))


def measure(target, draft, batch_sizes, repetitions, new_tokens, K, label, min_prompts):
    from dspark_jax.tools import bench

    rows = []
    for B in batch_sizes:
        calls = -(-min_prompts // B)  # small batches: several calls, so an arm times more than one short answer
        prompts = prompts_heldout(target, B * calls)
        groups = [prompts[i * B:(i + 1) * B] for i in range(calls)]
        log(f"{label} batch {B} ({calls} call(s) per arm):")
        timings = bench.interleave(arms(target, draft, groups, new_tokens, K), repetitions, log=log)
        warm = {name: [x.tokens for x in t.result] for name, t in timings.items()}
        for name in ("fixed", "auto"):
            assert warm[name] == warm["AR"], f"{label} batch {B}: {name} output differs from AR"
        stats = {name: _merged(t.result) for name, t in timings.items()}
        times = {name: t.times_s for name, t in timings.items()}
        tokens = sum(stats["AR"].num_generated)
        auto = stats["auto"]
        props = [n for row in auto.proposal_lengths for n in row]
        ar_rounds = sum(1 for n in props if n == 0) / max(1, len(props))
        row = {
            "batch": B,
            "AR tok/s": tokens / statistics.median(times["AR"]),
            "fixed tok/s": tokens / statistics.median(times["fixed"]),
            "auto tok/s": tokens / statistics.median(times["auto"]),
            "fixed / AR": statistics.median([a / f for a, f in zip(times["AR"], times["fixed"])]),
            "auto / AR": statistics.median([a / f for a, f in zip(times["AR"], times["auto"])]),
            "auto / fixed": statistics.median([f / a for a, f in zip(times["auto"], times["fixed"])]),
            "fixed tau": stats["fixed"].mean_acceptance_length,
            "auto tau": auto.mean_acceptance_length,
            "auto drafts verified / round": auto.draft_tokens_per_proposal,
            "auto AR-step rounds": ar_rounds,
            "calls": calls,
            "= AR": f"{B * calls}/{B * calls}",
        }
        log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
        rows.append(row)
    return rows


def table(rows) -> str:
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,4,16,64")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--draft-length", type=int, default=7)
    parser.add_argument("--min-prompts", type=int, default=8,
                        help="batch sizes below this run several calls of that size per arm (distinct prompts)")
    parser.add_argument("--inflate-mb", type=float, default=100.0, help="0 = skip the cost-inflated target")
    parser.add_argument("--out", default=str(RESULTS / "schedule"))
    parser.add_argument("--skip-builtin", action="store_true", help="only the cost-inflated target")
    args = parser.parse_args(argv)

    import dspark_jax as dj
    from dspark_jax.tools import bench

    sizes = [int(x) for x in args.batch_sizes.split(",")]
    target, draft = dj.load_target(dtype="float32"), dj.load_draft(dtype="float32")
    load_before = os.getloadavg()
    results = {"machine": bench.machine(), "load_before": load_before, "args": vars(args)}
    if not args.skip_builtin:
        results["builtin"] = measure(target, draft, sizes, args.repetitions, args.new_tokens, args.draft_length, "built-in",
                                     args.min_prompts)
    if args.inflate_mb > 0:
        from dspark_jax.engine import generation

        big = bench.inflate_target(target, args.inflate_mb)
        results["inflated_param_bytes"] = big.param_bytes
        # the extra layers come after the draft's feature layers and add exactly zero (tools/bench.py), so the
        # built-in draft serves the inflated target; its layer-count check is for real checkpoints
        generation.check_pair = lambda target, draft: None
        results["inflated"] = measure(big, draft, sizes, args.repetitions, args.new_tokens, args.draft_length, "inflated",
                                     args.min_prompts)
    results["load_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    md = ["# AR vs fixed vs auto (scheduled) speculative decoding\n",
          f"Built-in target + DSpark draft, float32, greedy, K={args.draft_length}, up to {args.new_tokens} new tokens, "
          f"held-out prompts (odd half), {args.repetitions} interleaved repetitions. Machine: "
          f"{results['machine'].get('cpu_model', '')} ({results['machine'].get('cpu_cores', '')} cores), load average "
          f"{load_before[0]:.1f} before / {results['load_after'][0]:.1f} after (shared machine).\n",
          ]
    if "builtin" in results:
        md += ["## Built-in target\n", table(results["builtin"]), ""]
    if args.inflate_mb > 0:
        md += [f"## Cost-inflated target ({results['inflated_param_bytes'] / 1e6:.0f} MB of parameters)\n",
               table(results["inflated"]), ""]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
