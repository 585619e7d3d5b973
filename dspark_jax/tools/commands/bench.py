"""`dspark-jax bench`: the benchmark report of a target + DSpark draft (+ DFlash, EAGLE-3 drafts) on prompt sets.

Runs the arms of benchmarks.md with the built-in trained drafts (or `--target/--draft/--dflash/--eagle3`):
* acceptance: every prompt set (first turn, chat template) at each temperature, with each draft: tau and
  acceptance by position (prefix survival, conditional);
* speed: AR vs speculative at each batch size, temperature 0, arms interleaved, compile time apart, median of
  `--repetitions`; with `--inflate-mb` also on the cost-inflated target (extra zero-output layers: same
  outputs, memory-bound cost).
Writes `report.md`, `report.json` (the same numbers plus everything measured) and PNG plots into `--out`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROMPT_SETS = ("gsm8k", "humaneval", "mbpp", "mt-bench")


def _list_of(convert, minimum, kind):
    """argparse `type` for comma-separated values of `convert`, each >= `minimum`."""

    def parse(text: str) -> list:
        try:
            values = [convert(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind}, got {text!r}") from None
        if not values or any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind} >= {minimum}, got {text!r}")
        return values

    return parse


def add_arguments(parser):
    parser.add_argument("--target", default=None, help="target checkpoint directory (default: the built-in trained target)")
    parser.add_argument("--draft", default=None, help="DSpark draft directory (default: the built-in DSpark draft)")
    parser.add_argument("--dflash", default=None,
                        help="DFlash draft directory (default: the built-in DFlash draft if present; 'none' = skip the arm)")
    parser.add_argument("--eagle3", default=None,
                        help="EAGLE-3 draft directory (default: the built-in EAGLE-3 draft if present; 'none' = skip the arm)")
    parser.add_argument("--prompts", nargs="+", default=None,
                        help=f"prompt-set JSONL files (default: {', '.join(PROMPT_SETS)} from $DSPARK_JAX_PROMPTS or "
                             "../shared/data/prompts)")
    parser.add_argument("--num-prompts", type=int, default=16, help="prompts per set (the first N valid lines)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=_list_of(int, 1, "integers"), default=[1, 4, 16, 64], help="comma-separated, e.g. 1,4,16,64")
    parser.add_argument("--temperatures", type=_list_of(float, 0, "numbers"), default=[0.0, 1.0], help="for acceptance, e.g. 0,1")
    parser.add_argument("--acceptance-batch", type=int, default=16, help="prompts per generate call in the acceptance runs")
    parser.add_argument("--draft-length", type=int, default=None, help="draft tokens per round K (default: block size)")
    parser.add_argument("--repetitions", type=int, default=3, help="timed repetitions per speed arm (median quoted)")
    parser.add_argument("--schedule", choices=("auto", "fixed", "both"), default="auto",
                        help="speculative speed arms: scheduled verification (auto), whole blocks (fixed), or both arms "
                             "per draft ('DSpark auto', 'DSpark fixed'); acceptance runs always use whole blocks")
    parser.add_argument("--inflate-mb", type=float, default=0.0,
                        help="also time a cost-inflated target with this many MB of extra zero-output layers (0 = off)")
    parser.add_argument("--dtype", default="auto", help="parameter dtype (auto: float32 on CPU, bfloat16 elsewhere)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-chat", action="store_true", help="feed the first turn as raw text instead of the chat template")
    parser.add_argument("--out", default="bench_report", help="output directory for report.md, report.json and PNGs")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _prompt_files(args) -> list[Path]:
    from dspark_jax.errors import InputError

    if args.prompts:
        files = [Path(p) for p in args.prompts]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise InputError(f"--prompts: {', '.join(missing)} not found; pass prompt-set JSONL files")
        return files
    from dspark_jax.training.corpus import default_prompt_dir

    directory = default_prompt_dir()
    files = [directory / f"{name}.jsonl" for name in PROMPT_SETS if (directory / f"{name}.jsonl").is_file()]
    if not files:
        raise InputError(f"no prompt sets found in {directory}; pass --prompts FILE [FILE ...] (JSONL, {{\"turns\": [...]}} lines)")
    return files


def _load_sets(files, tokenizer, num_prompts: int, chat: bool) -> dict[str, list[list[int]]]:
    from dspark_jax.errors import InputError
    from dspark_jax.tools import batch

    sets = {}
    for f in files:
        inputs = batch.read_prompts(f)
        if not inputs.prompts:
            raise InputError(f"{f} has no valid prompt lines")
        chosen = inputs.prompts[:num_prompts]
        sets[f.stem] = [tokenizer.encode(batch.prompt_text(p, tokenizer, chat), add_special_tokens=not chat) for p in chosen]
        if len(chosen) < num_prompts:
            log(f"{f}: only {len(chosen)} valid prompts (asked for {num_prompts})")
    return sets


def _acceptance(target, drafts, sets, temperatures, args, K) -> tuple[dict, dict]:
    """tau and acceptance by position per (prompt set, temperature, draft), and per (temperature, draft) over all sets.

    Rows of several generate calls (and, for the pooled numbers, of all sets) are pooled round by round.
    """
    import dspark_jax as dj
    from dspark_jax.engine.generation import GenerationStats

    def summary(rounds_lists, wall):
        stats = GenerationStats.from_rounds(*rounds_lists, K, wall)
        return {"tau": stats.mean_acceptance_length, "rounds": sum(stats.rounds), "tokens": sum(stats.num_generated),
                "prefix_survival": stats.prefix_survival, "conditional_acceptance": stats.conditional_acceptance,
                "verify_rate": stats.verify_rate}

    per_set, pooled = {}, {}
    for temp in temperatures:
        for draft_name, draft in drafts.items():
            everything = [[], [], [], [], []]
            for set_name, prompts in sets.items():
                lists, wall = [[], [], [], [], []], 0.0
                for start in range(0, len(prompts), args.acceptance_batch):
                    chunk = prompts[start : start + args.acceptance_batch]
                    s = dj.generate(target, draft, chunk, max_new_tokens=args.max_new_tokens, temperature=temp, seed=args.seed,
                                    draft_length=K, row_ids=range(start, start + len(chunk)), schedule="fixed").stats
                    for acc, part in zip(lists, (s.acceptance_lengths, s.proposal_lengths, s.accepted_draft_lengths,
                                                 s.num_generated, s.finish_reasons), strict=True):
                        acc += part
                    wall += s.wall_time_s
                for acc, part in zip(everything, lists, strict=True):
                    acc += part
                entry = summary(lists, wall)
                per_set[(set_name, temp, draft_name)] = {"set": set_name, "temperature": temp, "draft": draft_name,
                                                         "prompts": len(prompts), **entry}
                log(f"  {set_name} T={temp:g} {draft_name}: tau {entry['tau']:.3f} over {entry['rounds']} rounds")
            pooled[(temp, draft_name)] = {"temperature": temp, "draft": draft_name, **summary(everything, 0.0)}
    return per_set, pooled


def _speed(target, drafts, pool, batch_sizes, args, K) -> list[dict]:
    """AR vs speculative at each batch size (temperature 0), arms interleaved."""
    import dspark_jax as dj
    from dspark_jax.tools import bench

    rows = []
    for B in batch_sizes:
        prompts = [pool[i % len(pool)] for i in range(B)]

        def arm(draft, schedule="auto", prompts=prompts):
            return lambda: dj.generate(target, draft, prompts, max_new_tokens=args.max_new_tokens, temperature=0.0, seed=args.seed,
                                       draft_length=None if draft is None else K, schedule=schedule)

        arms = {"AR": arm(None)} | {arm_name: arm(drafts[name], schedule)
                                    for name, schedule, arm_name in _speed_arms(drafts, args)}
        log(f"  batch {B}: {', '.join(arms)} x {args.repetitions}")
        t = bench.interleave(arms, args.repetitions, log=log)
        ar_tokens = t["AR"].result.tokens
        row = {"batch": B, "arms": {}}
        for name, timing in t.items():
            res = timing.result
            tokens = sum(res.stats.num_generated)
            row["arms"][name] = {
                "tokens": tokens, "tokens_per_s": tokens / timing.median_s, "compile_s": timing.compile_s,
                "tau": res.stats.mean_acceptance_length if name != "AR" else 1.0,
                "identical_to_ar": sum(a == b for a, b in zip(res.tokens, ar_tokens, strict=True)),
                "timing": timing.summary(),
            }
        for _, _, name in _speed_arms(drafts, args):
            row["arms"][name]["speedup"] = row["arms"][name]["tokens_per_s"] / row["arms"]["AR"]["tokens_per_s"]
        rows.append(row)
    return rows


def _speed_arms(drafts, args) -> list[tuple[str, str, str]]:
    """(draft name, schedule, arm name) of the speculative speed arms."""
    schedules = ("auto", "fixed") if getattr(args, "schedule", "auto") == "both" else (getattr(args, "schedule", "auto"),)
    return [(name, s, name if len(schedules) == 1 else f"{name} {s}") for name in drafts for s in schedules]


def _speed_table(title, rows, draft_names, note=""):
    from dspark_jax.tools import bench

    columns = ["batch", "AR tok/s"]
    for name in draft_names:
        columns += [f"{name} tok/s", f"{name} speedup", f"{name} tau", f"{name} = AR"]
    body = []
    for r in rows:
        cells = [r["batch"], r["arms"]["AR"]["tokens_per_s"]]
        for name in draft_names:
            a = r["arms"][name]
            cells += [a["tokens_per_s"], a["speedup"], a["tau"], f"{a['identical_to_ar']}/{r['batch']}"]
        body.append(cells)
    return bench.Table(title, columns, body, note=note)


def _speed_plot(path, rows, draft_names, title):
    from dspark_jax.tools import bench

    plt = bench._pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    batches = [r["batch"] for r in rows]
    series = {"AR": [r["arms"]["AR"]["tokens_per_s"] for r in rows]}
    series |= {n: [r["arms"][n]["tokens_per_s"] for r in rows] for n in draft_names}
    bench.line_plot(None, batches, series, xlabel="batch size", ylabel="tokens/s", title=f"{title}: tokens/s", logx=True, ax=axes[0])
    bench.line_plot(None, batches, {n: [r["arms"][n]["speedup"] for r in rows] for n in draft_names}, xlabel="batch size",
                    ylabel="speedup over AR", title=f"{title}: speedup", logx=True, ax=axes[1])
    axes[1].axhline(1.0, color="gray", lw=1, ls="--")
    return bench.save_figure(fig, path)


def run(args) -> int:

    import dspark_jax as dj
    from dspark_jax import assets
    from dspark_jax.errors import ConfigError, InputError
    from dspark_jax.tools import bench

    for name in ("num_prompts", "max_new_tokens", "repetitions", "acceptance_batch"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.inflate_mb < 0:
        raise InputError(f"--inflate-mb must be >= 0, got {args.inflate_mb}")
    from dspark_jax.tools.commands.common import resolve_dtype

    dtype = resolve_dtype(args.dtype)
    files = _prompt_files(args)
    target_dir = Path(args.target) if args.target else assets.TARGET
    draft_dir = Path(args.draft) if args.draft else assets.DSPARK_DRAFT
    if args.dflash is not None and args.dflash.lower() == "none":
        dflash_dir = None
    elif args.dflash is not None:
        dflash_dir = Path(args.dflash)
    else:
        dflash_dir = assets.DFLASH_DRAFT if (assets.DFLASH_DRAFT / "config.json").exists() else None
        if dflash_dir is None:
            log(f"no built-in DFlash draft at {assets.DFLASH_DRAFT}: skipping the DFlash arm")
    if args.eagle3 is not None and args.eagle3.lower() == "none":
        eagle3_dir = None
    elif args.eagle3 is not None:
        eagle3_dir = Path(args.eagle3)
    else:  # the built-in EAGLE-3 draft serves the built-in target only
        eagle3_dir = assets.EAGLE3_DRAFT if args.target is None and (assets.EAGLE3_DRAFT / "config.json").exists() else None

    for flag, given, path in (("--target", args.target, target_dir), ("--draft", args.draft, draft_dir)):
        if given is None and not path.is_dir():
            raise InputError(f"the built-in trained pair is not installed ({path} is missing); pass {flag} DIR")
    target = dj.load_target(target_dir, dtype=dtype)
    drafts = {"DSpark": dj.load_draft(draft_dir, dtype=dtype)}
    if dflash_dir is not None:
        drafts["DFlash"] = dj.load_draft(dflash_dir, dtype=dtype)
    if eagle3_dir is not None:
        drafts["EAGLE-3"] = dj.load_draft(eagle3_dir, dtype=dtype)
    for d in drafts.values():
        dj.check_pair(target, d)
    K = args.draft_length or min(getattr(d.config, "block_size", None) or d.config.draft_length for d in drafts.values())
    tok = target.tokenizer
    if not args.no_chat and not tok.chat_template:
        raise ConfigError(f"{target_dir} has no chat template; pass --no-chat to feed the prompts as raw text")
    sets = _load_sets(files, tok, args.num_prompts, chat=not args.no_chat)
    draft_names = list(drafts)
    arm_names = [arm for _, _, arm in _speed_arms(drafts, args)]  # speed arms (per --schedule)

    log(f"acceptance: {len(sets)} prompt sets x {len(args.temperatures)} temperatures x {len(drafts)} drafts")
    acceptance, pooled = _acceptance(target, drafts, sets, args.temperatures, args, K)
    # Speed prompts: the sets interleaved (one of each in turn), cycled up to the batch size.
    pool = [p for group in zip(*sets.values(), strict=False) for p in group] or next(iter(sets.values()))
    log(f"speed: batch sizes {args.batch_sizes}")
    speed = _speed(target, drafts, pool, args.batch_sizes, args, K)
    inflated = None
    if args.inflate_mb > 0:
        big = bench.inflate_target(target, args.inflate_mb, seed=args.seed)
        big_drafts = {n: bench.retarget_draft(d, big) for n, d in drafts.items()}
        log(f"speed, cost-inflated target ({big.param_bytes / 1e6:.0f} MB of parameters): batch sizes {args.batch_sizes}")
        inflated = {"param_bytes": big.param_bytes, "num_layers": big.config.num_layers,
                    "rows": _speed(big, big_drafts, pool, args.batch_sizes, args, K)}

    # ------------------------------------------------------------------ tables, plots, files
    out = Path(args.out)
    temps = args.temperatures
    tau_table = bench.Table(
        "Mean acceptance length tau per prompt set",
        ["prompt set", "temperature", "prompts"] + [f"{n} tau" for n in draft_names],
        [[s, t, len(sets[s])] + [acceptance[(s, t, n)]["tau"] for n in draft_names] for s in sets for t in temps]
        + [["all", t, sum(map(len, sets.values()))] + [pooled[(t, n)]["tau"] for n in draft_names] for t in temps],
        note=f"tau counts the bonus token; K={K}, up to {args.max_new_tokens} new tokens per prompt.",
    )
    position_table = bench.Table(
        "Acceptance by position (prefix survival, all prompt sets)",
        ["position"] + [f"{n} T={t:g}" for n in draft_names for t in temps],
        [[i + 1] + [pooled[(t, n)]["prefix_survival"][i] for n in draft_names for t in temps] for i in range(K)],
        note="P(drafts 1..i all accepted | at least i proposed), over the rounds of all prompt sets.",
    )
    speed_table = _speed_table(
        f"Speed vs batch size (temperature 0, {target.param_bytes / 1e6:.0f} MB target as is)", speed, arm_names,
        note=f"tokens/s of whole `generate` calls (prefill included), median of {args.repetitions} interleaved repetitions; "
             "speedup = speculative / AR tokens/s; '= AR' counts outputs identical to AR.",
    )
    compile_table = bench.Table(
        "Compile time (s): first call minus a steady call",
        ["batch", "AR"] + arm_names,
        [[r["batch"]] + [r["arms"][a]["compile_s"] for a in ["AR", *arm_names]] for r in speed],
    )
    tables = [tau_table, position_table, speed_table, compile_table]
    figures = [
        bench.line_plot(out / "acceptance_by_position.png", list(range(1, K + 1)),
                        {f"{n} T={t:g}": pooled[(t, n)]["prefix_survival"] for n in draft_names for t in temps},
                        xlabel="draft position", ylabel="P(drafts 1..i accepted)", title="Acceptance by position"),
        bench.bar_plot(out / "tau_per_set.png", list(sets),
                       {f"{n} T={t:g}": [acceptance[(s, t, n)]["tau"] for s in sets] for n in draft_names for t in temps},
                       ylabel="mean acceptance length tau", title="tau per prompt set"),
        _speed_plot(out / "speed_vs_batch.png", speed, arm_names, "target as is"),
    ]
    if inflated is not None:
        tables.append(_speed_table(
            f"Speed vs batch size (temperature 0, cost-inflated target: {inflated['param_bytes'] / 1e6:.0f} MB, "
            f"{inflated['num_layers']} layers)", inflated["rows"], arm_names,
            note="the target plus extra layers whose output projections are zero: identical outputs, memory-bound cost."))
        figures.append(_speed_plot(out / "speed_vs_batch_inflated.png", inflated["rows"], arm_names, "cost-inflated"))
    meta = {
        "machine": bench.machine(), "dtype": dtype, "K": K, "target": str(target_dir), "drafts": {n: str(p) for n, p in
        [("DSpark", draft_dir), ("DFlash", dflash_dir), ("EAGLE-3", eagle3_dir)] if p is not None}, "target_params": target.num_params,
        "draft_params": {n: d.num_params for n, d in drafts.items()}, "prompt_files": [str(f) for f in files],
        "prompts_per_set": {s: len(p) for s, p in sets.items()}, "chat_template": not args.no_chat,
        "max_new_tokens": args.max_new_tokens, "temperatures": temps, "batch_sizes": args.batch_sizes,
        "repetitions": args.repetitions, "seed": args.seed, "inflate_mb": args.inflate_mb,
    }
    data = {"acceptance": list(acceptance.values()), "acceptance_all_sets": list(pooled.values()), "speed": speed,
            "speed_inflated": inflated}
    json_path, md_path = bench.write_report(
        out, "report", title="dspark-jax benchmark report", tables=tables, meta=meta, data=data, figures=figures,
        intro=f"Target `{target_dir}` ({target.num_params / 1e6:.2f}M params, {dtype}), drafts: "
              + ", ".join(f"{n} `{p}`" for n, p in meta["drafts"].items())
              + f". {meta['machine']['cpu_model']} ({meta['machine']['cpu_cores']} cores, {meta['machine']['jax_backend']}), "
              f"jax {meta['machine']['versions']['jax']}. Prompt sets: {', '.join(f'{s} ({len(p)})' for s, p in sets.items())}, "
              f"first turn{', chat template' if not args.no_chat else ''}.",
    )
    print(md_path.read_text())
    log(f"wrote {md_path}, {json_path} and {len(figures)} PNG plots")
    return 0
