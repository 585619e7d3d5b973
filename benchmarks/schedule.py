"""AR vs fixed-length vs scheduled (`schedule="auto"`) speculative decoding against batch size, for the built-in
DSpark, DFlash and EAGLE-3 drafts, on the built-in target and on its cost-inflated target (issues 17 and 24;
docs/algorithm.md §4.4-§4.5).

Prompts: the held-out half of `assets/heldout_prompts.jsonl` that `dspark-jax calibrate` did not fit on (odd
indices), first turn, chat template; greedy; float32. A batch size `B` below `--min-prompts` runs
`ceil(min_prompts / B)` calls of `B` distinct prompts per arm. Per target and batch size, the arms — AR, then
fixed and auto for every draft — are warmed up (compile; for auto the deterministic cost model, traced once
per draft and batch) and then run interleaved `--repetitions` times in this one process; tokens/s = generated
tokens / wall time of the whole `generate` calls (prefill included). `auto / best` is the median over
repetitions of auto's speed over the faster of fixed and AR in that repetition. Every arm's output is checked
equal to AR's. `auto` uses the default cost model with an empty `DSPARK_JAX_CACHE` (no stored profile):
the deterministic compiled-program model.

Then, for the DFlash draft under auto: the drafts verified per round on the math (gsm8k) and code (humaneval,
mbpp) prompts of the held-out half, one call of `--set-prompts` prompts each.

    python benchmarks/schedule.py --batch-sizes 1,4,16,64 --repetitions 2 --new-tokens 32 --inflate-mb 50
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax

RESULTS = Path(__file__).resolve().parent / "results"
DRAFTS = ("dspark", "dflash", "eagle3")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def heldout(target, sets=None):
    """Token ids of the held-out half's first turns (chat template), optionally only from `sets`."""
    from dspark_jax import assets
    from dspark_jax.tools import batch

    tok = target.tokenizer
    path = assets.ROOT / "heldout_prompts.jsonl"
    lines = path.read_text().splitlines()
    chosen = batch.read_prompts(path).prompts[1::2]
    return [tok.encode(batch.prompt_text(p, tok, True), add_special_tokens=False)
            for p in chosen if sets is None or json.loads(lines[p.line])["set"] in sets]


def arms(target, drafts, groups, new_tokens, K):
    """Each arm runs every group of prompts as one `generate` call (batch = the group's size), in turn."""
    import dspark_jax as dj

    def run(draft, **kw):
        return lambda: [dj.generate(target, draft, g, max_new_tokens=new_tokens, **kw) for g in groups]

    out = {"AR": run(None)}
    for name, draft in drafts.items():
        out[f"{name} fixed"] = run(draft, draft_length=K, schedule="fixed")
        out[f"{name} auto"] = run(draft, draft_length=K, schedule="auto")
    return out


def _merged(results):
    from dspark_jax.engine.generation import GenerationStats

    st = [r.stats for r in results]
    cat = lambda f: [x for s in st for x in getattr(s, f)]
    K = len(st[0].prefix_survival)
    return GenerationStats.from_rounds(cat("acceptance_lengths"), cat("proposal_lengths"),
                                       cat("accepted_draft_lengths"), cat("num_generated"), cat("finish_reasons"), K,
                                       sum(s.wall_time_s for s in st))


def measure(target, drafts, batch_sizes, repetitions, new_tokens, K, label, min_prompts):
    from dspark_jax.engine import generation
    from dspark_jax.tools import bench

    pool = heldout(target)
    rows = []
    for B in batch_sizes:
        calls = -(-min_prompts // B)
        prompts = [pool[i % len(pool)] for i in range(B * calls)]
        groups = [prompts[i * B:(i + 1) * B] for i in range(calls)]
        log(f"{label} batch {B} ({calls} call(s) per arm), load {os.getloadavg()[0]:.1f}:")
        timings = bench.interleave(arms(target, drafts, groups, new_tokens, K), repetitions, log=log)
        outputs = {name: [x.tokens for x in t.result] for name, t in timings.items()}
        times = {name: t.times_s for name, t in timings.items()}
        stats = {name: _merged(t.result) for name, t in timings.items()}
        tokens = sum(stats["AR"].num_generated)
        for name, draft in drafts.items():
            for arm in ("fixed", "auto"):
                assert outputs[f"{name} {arm}"] == outputs["AR"], f"{label} batch {B}: {name} {arm} differs from AR"
            auto = stats[f"{name} auto"]
            props = [n for row in auto.proposal_lengths for n in row]
            best = [min(a, f) for a, f in zip(times["AR"], times[f"{name} fixed"])]
            _, costs = generation.schedule_plan(target, draft, B, K)
            row = {
                "draft": name,
                "batch": B,
                "AR tok/s": tokens / statistics.median(times["AR"]),
                "fixed tok/s": tokens / statistics.median(times[f"{name} fixed"]),
                "auto tok/s": tokens / statistics.median(times[f"{name} auto"]),
                "auto / best": statistics.median([b / a for b, a in zip(best, times[f"{name} auto"])]),
                "fixed tau": stats[f"{name} fixed"].mean_acceptance_length,
                "auto tau": auto.mean_acceptance_length,
                "auto drafts / round": sum(props) / max(1, len(props)),
                "auto AR-step rounds": sum(1 for n in props if n == 0) / max(1, len(props)),
                "model verify (AR steps)": "/".join(f"{v:.2f}" for v in costs.verify),
                "model draft": costs.draft,
                "= AR": f"{len(prompts)}/{len(prompts)}",
            }
            log(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}))
            rows.append(row)
        # this batch size's programs are done with: one process holding every arm's programs for every batch size
        # and both targets ran XLA:CPU out of code memory ("LLVM ERROR: Unable to allocate section memory")
        jax.clear_caches()
    return rows


def dflash_sets(target, draft, n, new_tokens, K):
    """DFlash under auto on the held-out math and code prompts, one call per set."""
    import dspark_jax as dj

    out = []
    for name, sets in (("math (gsm8k)", {"gsm8k"}), ("code (humaneval, mbpp)", {"humaneval", "mbpp"})):
        prompts = heldout(target, sets)[:n]
        auto = dj.generate(target, draft, prompts, max_new_tokens=new_tokens, draft_length=K, schedule="auto").stats
        props = [x for row in auto.proposal_lengths for x in row]
        out.append({"set": name, "prompts": len(prompts), "auto tau": auto.mean_acceptance_length,
                    "auto rounds": len(props),
                    "auto drafts verified / round": sum(props) / max(1, len(props)),
                    "auto rounds with drafts": sum(1 for x in props if x > 0) / max(1, len(props))})
        log(json.dumps(out[-1]))
    return out


def table(rows) -> str:
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,4,16,64")
    parser.add_argument("--drafts", default=",".join(DRAFTS))
    parser.add_argument("--repetitions", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--draft-length", type=int, default=7)
    parser.add_argument("--min-prompts", type=int, default=4,
                        help="batch sizes below this run several calls of that size per arm (distinct prompts)")
    parser.add_argument("--inflate-mb", type=float, default=50.0, help="0 = skip the cost-inflated target")
    parser.add_argument("--inflated-new-tokens", type=int, default=None, help="default: --new-tokens")
    parser.add_argument("--skip-builtin", action="store_true", help="only the cost-inflated target")
    parser.add_argument("--set-prompts", type=int, default=8, help="prompts per set for the DFlash check (0: skip)")
    parser.add_argument("--out", default=str(RESULTS / "schedule"))
    args = parser.parse_args(argv)

    os.environ["DSPARK_JAX_CACHE"] = tempfile.mkdtemp(prefix="dspark_jax_bench_")  # no stored profile
    import dspark_jax as dj
    from dspark_jax import assets
    from dspark_jax.tools import bench

    sizes = [int(x) for x in args.batch_sizes.split(",")]
    target = dj.load_target(dtype="float32")
    drafts = {name: dj.load_draft(getattr(assets, f"{name.upper()}_DRAFT"), dtype="float32")
              for name in args.drafts.split(",")}
    t0 = time.time()
    results = {"machine": bench.machine(), "load_before": os.getloadavg(), "args": vars(args)}
    if not args.skip_builtin:
        results["builtin"] = measure(target, drafts, sizes, args.repetitions, args.new_tokens, args.draft_length,
                                     "built-in", args.min_prompts)
        results["load_after_builtin"] = os.getloadavg()
    if args.inflate_mb > 0:
        from dspark_jax.engine import generation

        big = bench.inflate_target(target, args.inflate_mb)
        results["inflated_param_bytes"] = big.param_bytes
        # the extra layers come after the drafts' feature layers and add exactly zero (tools/bench.py), so the
        # built-in drafts serve the inflated target; the layer-count check is for real checkpoints
        generation.check_pair = lambda target, draft: None
        results["inflated"] = measure(big, drafts, sizes, args.repetitions, args.inflated_new_tokens or args.new_tokens,
                                      args.draft_length, "inflated", args.min_prompts)
    if args.set_prompts > 0 and "dflash" in drafts:
        results["dflash_sets"] = dflash_sets(target, drafts["dflash"], args.set_prompts, args.new_tokens,
                                             args.draft_length)
    results["load_after"] = os.getloadavg()
    results["wall_s"] = time.time() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    m = results["machine"]
    md = ["# AR vs fixed vs auto (scheduled) speculative decoding\n",
          f"Built-in target and its drafts ({', '.join(drafts)}), float32, greedy, K={args.draft_length}, up to "
          f"{args.new_tokens} new tokens, held-out prompts (odd half), {args.repetitions} interleaved repetitions "
          f"after a first (compiling) call; auto uses the deterministic compiled-program cost model (no stored "
          f"profile). Machine: {m.get('cpu_model', '')} ({m.get('cpu_cores', '')} cores, {m.get('jax_backend')}), "
          f"shared with three other sessions: load average {results['load_before'][0]:.1f} before / "
          f"{results['load_after'][0]:.1f} after; {results['wall_s'] / 60:.0f} min in all.\n",
          f"Command: `python benchmarks/schedule.py {' '.join(argv) if argv else ' '.join(sys.argv[1:])}`\n"]
    if "builtin" in results:
        md += ["## Built-in target\n", table(results["builtin"]), ""]
    if "inflated" in results:
        md += [f"## Cost-inflated target ({results['inflated_param_bytes'] / 1e6:.0f} MB of parameters, up to "
               f"{args.inflated_new_tokens or args.new_tokens} new tokens)\n",
               table(results["inflated"]), ""]
    if "dflash_sets" in results:
        md += ["## DFlash under auto: drafts verified per round by prompt set (built-in target)\n",
               table(results["dflash_sets"]), ""]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
