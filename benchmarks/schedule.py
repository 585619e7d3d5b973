"""AR vs fixed-length vs scheduled (`schedule="auto"`) speculative decoding against batch size, on the built-in
pair and on its cost-inflated target (issue 17; docs/algorithm.md §4.5).

Prompts: the held-out half of `assets/heldout_prompts.jsonl` that `dspark-jax calibrate` did not fit on (odd
indices), first turn, chat template; greedy; the built-in DSpark draft (float32). Per batch size every arm is
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


def arms(target, draft, prompts, new_tokens, K):
    import dspark_jax as dj

    kw = dict(max_new_tokens=new_tokens, draft_length=K)
    return {
        "AR": lambda: dj.generate(target, None, prompts, max_new_tokens=new_tokens),
        "fixed": lambda: dj.generate(target, draft, prompts, schedule="fixed", **kw),
        "auto": lambda: dj.generate(target, draft, prompts, schedule="auto", **kw),
    }


def measure(target, draft, batch_sizes, repetitions, new_tokens, K, label):
    from dspark_jax.tools import bench

    rows = []
    for B in batch_sizes:
        prompts = prompts_heldout(target, B)
        log(f"{label} batch {B}:")
        timings = bench.interleave(arms(target, draft, prompts, new_tokens, K), repetitions, log=log)
        warm = {name: t.result for name, t in timings.items()}
        for name in ("fixed", "auto"):
            assert warm[name].tokens == warm["AR"].tokens, f"{label} batch {B}: {name} output differs from AR"
        times = {name: t.times_s for name, t in timings.items()}
        tokens = sum(warm["AR"].stats.num_generated)
        auto = warm["auto"].stats
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
            "fixed tau": warm["fixed"].stats.mean_acceptance_length,
            "auto tau": auto.mean_acceptance_length,
            "auto drafts verified / round": auto.draft_tokens_per_proposal,
            "auto AR-step rounds": ar_rounds,
            "= AR": f"{B}/{B}",
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
        results["builtin"] = measure(target, draft, sizes, args.repetitions, args.new_tokens, args.draft_length, "built-in")
    if args.inflate_mb > 0:
        from dspark_jax.engine import generation

        big = bench.inflate_target(target, args.inflate_mb)
        results["inflated_param_bytes"] = big.param_bytes
        # the extra layers come after the draft's feature layers and add exactly zero (tools/bench.py), so the
        # built-in draft serves the inflated target; its layer-count check is for real checkpoints
        generation.check_pair = lambda target, draft: None
        results["inflated"] = measure(big, draft, sizes, args.repetitions, args.new_tokens, args.draft_length, "inflated")
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
