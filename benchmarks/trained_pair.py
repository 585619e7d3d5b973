"""The shipped trained drafts: acceptance of DSpark vs DFlash vs EAGLE-3 on held-out prompts, and speed vs AR.

Everything in one run (benchmarks.md): the built-in target (`dspark_jax.assets.TARGET`, trained from scratch by
`dspark-jax build-fixture`) with its DSpark, DFlash and EAGLE-3 drafts (the last when installed: docs/eagle3.md
§9), float32 on CPU.

* Acceptance: the held-out test prompts of every prompt set (`assets/heldout_prompts.jsonl`: the first prompts of
  each set, which neither the target nor the drafts were trained on; checked against the prompt files below),
  chat template, temperature 0 and 1, K = block size: tau (bonus token included), and by position the prefix
  survival P(drafts 1..i accepted) and the conditional acceptance P(draft i accepted | 1..i-1 accepted).
* Speed, batch 1: AR and one arm per draft interleaved (A B C D A B C D ...), each arm decoding the same
  `--speed-prompts` prompts one at a time with `dj.generate` (prefill included, stop tokens honoured), compile
  time apart, median of `--repetitions`; on the target as is and on the cost-inflated target
  (`bench.inflate_target`: extra layers with zero output projections, identical outputs, `--inflate-mb` MB).
* Speed vs batch size (`--batch-sizes`, temperature 0, target as is): one `dj.generate` call over a batch of
  held-out prompts per arm, arms interleaved (`dspark-jax bench`'s speed runs).

    python benchmarks/trained_pair.py                      # writes results/trained_pair.{json,md}
    python benchmarks/trained_pair.py --num-prompts 8 --repetitions 2 --batch-sizes 1,4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

import dspark_jax as dj  # noqa: E402
from dspark_jax import assets  # noqa: E402
from dspark_jax.tools import bench  # noqa: E402
from dspark_jax.tools.commands.bench import _acceptance, _speed  # noqa: E402
from dspark_jax.training.corpus import default_prompt_dir, read_prompt_set  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BAR_TAU_RATIO = 1.10


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def heldout_sets(path: Path, prompts_dir: Path, num_prompts: int) -> dict[str, list[str]]:
    """Held-out prompts per set, each verified to be one of the first (test) lines of its prompt file."""
    sets: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        sets.setdefault(record["set"], []).append(record["turns"][0])
    for name, prompts in sets.items():
        source = read_prompt_set(prompts_dir / f"{name}.jsonl")
        if source[: len(prompts)] != prompts:
            raise SystemExit(f"{path}: the held-out {name} prompts are not the head of {prompts_dir / name}.jsonl")
    return {name: prompts[:num_prompts] for name, prompts in sets.items()}


def retarget(draft, target):
    """`draft` declared for `target`'s layer count (the cost-inflated target's extra layers come last): the config
    and the module built from it, so `check_pair` sees the new count (`bench.retarget_draft` replaces the config only)."""
    import dataclasses

    from flax import nnx

    from dspark_jax.layers.params import Init

    cfg = dataclasses.replace(draft.config, num_target_layers=target.config.num_layers)
    module_class = type(draft.module)
    graphdef = nnx.split(nnx.eval_shape(lambda: module_class(cfg, Init(nnx.Rngs(0), draft.dtype))))[0]
    return dataclasses.replace(draft, config=cfg, graphdef=graphdef)


def speed_arms(target, drafts, prompts, temperature, max_new_tokens, seed):
    """Zero-argument callables: each decodes every prompt at batch 1, one after another."""

    def arm(draft):
        def call():
            results = [dj.generate(target, draft, [p], max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
                       for p in prompts]
            return results

        return call

    return {"AR": arm(None)} | {name: arm(d) for name, d in drafts.items()}


def speed_rows(timings, label, temperature):
    ar_tokens = [r.tokens[0] for r in timings["AR"].result]
    ar_tps = sum(len(t) for t in ar_tokens) / timings["AR"].median_s
    row = {"target": label, "temperature": temperature, "AR_tok_s": ar_tps, "AR_compile_s": timings["AR"].compile_s, "arms": {}}
    for name, t in timings.items():
        if name == "AR":
            continue
        results = t.result
        tokens = sum(len(r.tokens[0]) for r in results)
        acc = [x for r in results for x in r.stats.acceptance_lengths[0]]
        row["arms"][name] = {
            "tok_s": tokens / t.median_s, "speedup": tokens / t.median_s / ar_tps, "tau": sum(acc) / max(len(acc), 1),
            "compile_s": t.compile_s, "identical_to_ar": sum(r.tokens[0] == a for r, a in zip(results, ar_tokens, strict=True)),
            "timing": t.summary(),
        }
    row["AR_timing"] = timings["AR"].summary()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=16, help="held-out prompts per set for acceptance")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--speed-prompts", type=int, default=4, help="prompts per speed arm (one per set in turn)")
    p.add_argument("--speed-max-new-tokens", type=int, default=96)
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--batch-sizes", default="1,4,16", help="comma-separated batch sizes of the speed-vs-batch runs ('' = skip)")
    p.add_argument("--inflate-mb", type=float, default=200.0)
    p.add_argument("--acceptance-batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    dtype = "float32"
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]

    target = dj.load_target(assets.TARGET, dtype=dtype)
    drafts = {"DSpark": dj.load_draft(assets.DSPARK_DRAFT, dtype=dtype), "DFlash": dj.load_draft(assets.DFLASH_DRAFT, dtype=dtype)}
    if (assets.EAGLE3_DRAFT / "config.json").exists():
        drafts["EAGLE-3"] = dj.load_draft(assets.EAGLE3_DRAFT, dtype=dtype)
    for d in drafts.values():
        dj.check_pair(target, d)
    K = drafts["DSpark"].config.block_size
    tok = target.tokenizer
    prompts_dir = default_prompt_dir()
    texts = heldout_sets(assets.ROOT / "heldout_prompts.jsonl", prompts_dir, args.num_prompts)
    sets = {name: [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)) for t in ps]
            for name, ps in texts.items()}
    machine = bench.machine()
    log(f"{machine['cpu_model']} x{machine['cpu_cores']}, load {machine['load_average']}; sets {[(s, len(v)) for s, v in sets.items()]}")

    temps = [0.0, 1.0]
    log("acceptance ...")
    per_set, pooled = _acceptance(target, drafts, sets, temps, args, K)

    pool = [q for group in zip(*sets.values(), strict=False) for q in group]
    batch_rows = []
    if batch_sizes:
        log(f"speed vs batch size {batch_sizes}, target as is, T=0")
        batch_args = argparse.Namespace(max_new_tokens=args.speed_max_new_tokens, seed=args.seed, repetitions=args.repetitions,
                                        schedule="auto")
        batch_rows = _speed(target, drafts, pool, batch_sizes, batch_args, K)
    pool = pool[: args.speed_prompts]
    big = bench.inflate_target(target, args.inflate_mb, seed=args.seed)
    big_drafts = {n: retarget(d, big) for n, d in drafts.items()}
    speed = []
    for label, tgt, drs in (("as is", target, drafts), ("cost-inflated", big, big_drafts)):
        for temp in temps:
            log(f"speed, target {label}, T={temp:g}, batch 1, {len(pool)} prompts x {args.repetitions} repetitions")
            t = bench.interleave(speed_arms(tgt, drs, pool, temp, args.speed_max_new_tokens, args.seed), args.repetitions, log=log)
            speed.append(speed_rows(t, label, temp))

    names = list(drafts)
    tau = {(t, n): pooled[(t, n)]["tau"] for t in temps for n in names}
    ratio_t1 = tau[(1.0, "DSpark")] / tau[(1.0, "DFlash")]
    inflated_speedup = {(r["temperature"], n): r["arms"][n]["speedup"] for r in speed if r["target"] == "cost-inflated" for n in names}
    bars = {
        "dspark_over_dflash_tau_T1": ratio_t1, "bar_tau_ratio": BAR_TAU_RATIO, "tau_bar_met": ratio_t1 >= BAR_TAU_RATIO,
        "dspark_speedup_inflated_b1_T0": inflated_speedup.get((0.0, "DSpark")),
        "speed_bar_met": (inflated_speedup.get((0.0, "DSpark")) or 0) > 1.0,
        "speedup_inflated_b1": {f"{n} T={t:g}": inflated_speedup[(t, n)] for t in temps for n in names},
    }
    if "EAGLE-3" in names:
        bars["dspark_over_eagle3_tau"] = {f"T={t:g}": tau[(t, "DSpark")] / tau[(t, "EAGLE-3")] for t in temps}
    tables = [
        bench.Table(
            "tau on held-out prompts (all sets pooled)",
            ["temperature"] + [f"{n} tau" for n in names] + ["DSpark / DFlash"]
            + (["DSpark / EAGLE-3"] if "EAGLE-3" in names else []) + [f"rounds ({n})" for n in names],
            [[t] + [tau[(t, n)] for n in names] + [tau[(t, "DSpark")] / tau[(t, "DFlash")]]
             + ([tau[(t, "DSpark")] / tau[(t, "EAGLE-3")]] if "EAGLE-3" in names else [])
             + [pooled[(t, n)]["rounds"] for n in names] for t in temps],
            note=f"K={K} (DSpark / DFlash blocks of 7, EAGLE-3 chains of 7), up to {args.max_new_tokens} new tokens, "
                 f"{sum(map(len, sets.values()))} prompts; bar: DSpark / DFlash >= {BAR_TAU_RATIO} at temperature 1.",
        ),
        bench.Table(
            "tau per prompt set", ["set", "temperature", "prompts"] + [f"{n} tau" for n in names],
            [[s, t, len(sets[s])] + [per_set[(s, t, n)]["tau"] for n in names] for s in sets for t in temps],
        ),
        bench.Table(
            "Acceptance by position: prefix survival P(drafts 1..i accepted)",
            ["position"] + [f"{n} T={t:g}" for t in temps for n in names],
            [[i + 1] + [pooled[(t, n)]["prefix_survival"][i] for t in temps for n in names] for i in range(K)],
        ),
        bench.Table(
            "Acceptance by position: conditional P(draft i accepted | drafts 1..i-1 accepted)",
            ["position"] + [f"{n} T={t:g}" for t in temps for n in names],
            [[i + 1] + [pooled[(t, n)]["conditional_acceptance"][i] for t in temps for n in names] for i in range(K)],
        ),
    ]
    if batch_rows:
        columns = ["batch", "AR tok/s"]
        for n in names:
            columns += [f"{n} tok/s", f"{n} speedup", f"{n} = AR"]
        tables.append(bench.Table(
            "Speed vs batch size (temperature 0, target as is; tokens/s, median of interleaved repetitions)", columns,
            [[r["batch"], r["arms"]["AR"]["tokens_per_s"]]
             + [c for n in names for c in (r["arms"][n]["tokens_per_s"], r["arms"][n]["speedup"],
                                            f"{r['arms'][n]['identical_to_ar']}/{r['batch']}")] for r in batch_rows],
            note=f"one `dj.generate` call per arm over `batch` held-out prompts (cycled), up to {args.speed_max_new_tokens} new "
                 "tokens, prefill included, scheduled verification (schedule='auto'); '= AR' counts outputs identical to AR.",
        ))
    columns = ["target", "temperature", "AR tok/s"]
    for n in names:
        columns += [f"{n} tok/s", f"{n} speedup", f"{n} tau", f"{n} = AR"]
    tables += [
        bench.Table(
            "End-to-end speed at batch 1 (tokens/s, median of interleaved repetitions)", columns,
            [[r["target"], r["temperature"], r["AR_tok_s"]]
             + [c for n in names for c in (r["arms"][n]["tok_s"], r["arms"][n]["speedup"], r["arms"][n]["tau"],
                                            f"{r['arms'][n]['identical_to_ar']}/{len(pool)}")] for r in speed],
            note=f"{len(pool)} held-out prompts decoded one at a time (prefill included, stop tokens honoured), up to "
                 f"{args.speed_max_new_tokens} new tokens; cost-inflated target: {big.param_bytes / 1e6:.0f} MB, "
                 f"{big.config.num_layers} layers (target as is: {target.param_bytes / 1e6:.1f} MB). '= AR' counts outputs "
                 "identical to AR (expected at temperature 0).",
        ),
        bench.Table(
            "Compile time (s): first call minus a steady call",
            ["target", "temperature", "AR"] + names,
            [[r["target"], r["temperature"], r["AR_compile_s"]] + [r["arms"][n]["compile_s"] for n in names] for r in speed],
        ),
    ]
    load_end = list(os.getloadavg())
    meta = {"machine": machine, "load_average_end": load_end, "dtype": dtype, "K": K, "target": "dspark_jax/assets/target", "target_params": target.num_params,
            "draft_params": {n: d.num_params for n, d in drafts.items()}, "inflated_param_bytes": big.param_bytes,
            "inflated_layers": big.config.num_layers, "prompts_per_set": {s: len(v) for s, v in sets.items()},
            "max_new_tokens": args.max_new_tokens, "speed_prompts": len(pool), "speed_max_new_tokens": args.speed_max_new_tokens,
            "repetitions": args.repetitions, "batch_sizes": batch_sizes, "seed": args.seed, "bars": bars,
            "fixture": json.loads((assets.ROOT / "fixture.json").read_text()).get("stages")}
    if (assets.EAGLE3_DRAFT / "training.json").exists():
        meta["eagle3_training"] = json.loads((assets.EAGLE3_DRAFT / "training.json").read_text())
    data = {"acceptance": list(per_set.values()), "acceptance_all_sets": list(pooled.values()), "speed": speed,
            "speed_vs_batch": batch_rows}
    sizes = ", ".join(f"{n} draft {d.num_params / 1e6:.2f}M" for n, d in drafts.items())
    speedups = "; ".join(f"{n} {inflated_speedup[(0.0, n)]:.2f}x" for n in names)
    _, md_path = bench.write_report(
        args.out, "trained_pair", title="The shipped trained drafts: " + " vs ".join(names) + " on held-out prompts",
        tables=tables, meta=meta, data=data,
        intro=f"Target {target.num_params / 1e6:.2f}M params (Qwen3, trained from scratch by `dspark-jax build-fixture`), {sizes} "
              f"(each includes its frozen embedding and LM head copies), {dtype}. {machine['cpu_model']} ({machine['cpu_cores']} "
              f"cores, load average {np.round(machine['load_average'], 1).tolist()} at the start and "
              f"{np.round(load_end, 1).tolist()} at the end: the machine is shared, so "
              f"only ratios of interleaved arms are meaningful), jax {machine['versions']['jax']}. Bars: DSpark/DFlash tau at "
              f"T=1 = {ratio_t1:.3f} (>= {BAR_TAU_RATIO}: {bars['tau_bar_met']}); speed-up over AR on the cost-inflated target, "
              f"batch 1, T=0: {speedups} (DSpark > 1: {bars['speed_bar_met']}).",
    )
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
