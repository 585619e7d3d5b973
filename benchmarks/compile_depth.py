"""First-call overhead of `dj.generate` against target depth: does compilation grow with the number of layers?

The design (`../shared/design/architecture.md`) runs stacked layers under `lax.scan` "so compile time does not
grow with depth". This script measures it through the public API: random Qwen3 targets of one width at several
depths (default 8, 32 and 64 layers, hidden 256, fp32), each generating greedily for a small batch of fixed
prompts, plain AR (`dj.generate(target, None, prompts, ...)`) and speculative with a random one-layer DSpark
draft (`synthetic.random_draft`, `synthetic.draft_config_for`).

First-call overhead = wall time of the first `dj.generate` call (tracing, lowering, XLA compilation and one run)
minus the wall time of an identical later call (steady state: the median of `--steady-calls` calls). Every
(depth, mode) runs in a fresh worker process, so nothing compiled for one arm is reused by another; JAX's
persistent compilation cache is off in the workers (`JAX_ENABLE_COMPILATION_CACHE=false`,
`JAX_COMPILATION_CACHE_DIR` unset, and `jax_enable_compilation_cache` set to False; a cache hit would be
counted and reported). The workers run in the order A B C A B C ... (each repetition goes through every mode and
depth), and the ratio to the shallowest depth is taken per repetition, then the median over repetitions is
quoted. JAX's own compile events (`jax.monitoring`: jaxpr tracing, lowering to MLIR, backend compilation),
summed over the first call, show where the overhead goes; nested jits may count their tracing inside their
caller's as well.

The bar: first-call overhead at 64 layers <= 1.5 x at 8 layers, for both AR and speculative.

    python benchmarks/compile_depth.py                                   # this checkout, 8/32/64 layers
    python benchmarks/compile_depth.py --rev HEAD --name compile_depth_before
    python benchmarks/compile_depth.py --depths 8,16 --repetitions 1 --out /tmp/cd   # quick check
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_runtime import (  # noqa: E402
    describe_tree,
    foreign_modules,
    import_bench,
    import_synthetic,
    pin_library_root,
    qwen3_config_class,
    tree_for,
    worker_env,
)

RESULTS = Path(__file__).resolve().parent / "results"
RESULT_PREFIX = "COMPILE_DEPTH_RESULT "
JAX_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "backend_compile_s",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ the worker


def worker(args) -> int:
    """Build one target (and draft), time a first and `steady_calls` more identical `dj.generate` calls."""
    library_file = pin_library_root(args.expect_root)
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    import numpy as np

    import dspark_jax as dj

    durations: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)

    def on_duration(event, duration, **kwargs):
        durations[event] += duration
        counts[event] += 1

    def on_event(event, **kwargs):
        counts[event] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)

    def take_events() -> dict:
        out = {name: durations.get(event, 0.0) for event, name in JAX_EVENTS.items()}
        out["backend_compiles"] = counts.get("/jax/core/compile/backend_compile_duration", 0)
        out["persistent_cache_hits"] = counts.get("/jax/compilation_cache/cache_hits", 0)
        durations.clear()
        counts.clear()
        return out

    config = qwen3_config_class()(
        model_type="qwen3", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate or 3 * args.hidden,
        num_layers=args.depth, num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
        tie_word_embeddings=False, max_position_embeddings=4096,
    )
    t0 = time.perf_counter()
    target = dj.Target.random(config, dtype="float32", seed=args.seed)
    draft = None
    if args.mode == "spec":
        synthetic = import_synthetic()
        draft = synthetic.random_draft(target, synthetic.draft_config_for(target.config, num_layers=args.draft_layers),
                                       seed=args.seed + 1)
    jax.block_until_ready((target.params, None if draft is None else draft.params))
    build_s = time.perf_counter() - t0
    take_events()
    prompts = np.random.default_rng(args.seed).integers(0, args.vocab, (args.batch, args.prompt_len)).tolist()

    def call():
        t0 = time.perf_counter()
        res = dj.generate(target, draft, prompts, max_new_tokens=args.max_new_tokens, temperature=0.0, stop_token_ids=[])
        return time.perf_counter() - t0, res

    first_s, res = call()
    first_events = take_events()
    steady = [call()[0] for _ in range(args.steady_calls)]
    steady_events = take_events()
    foreign = foreign_modules(args.expect_root)
    if foreign:
        raise SystemExit(f"library modules imported from outside the tree {args.expect_root}: {foreign}")
    out = {
        "library_file": library_file, "depth": args.depth, "mode": args.mode, "build_s": build_s,
        "target_params": int(sum(np.size(x) for x in jax.tree.leaves(target.params))),
        "draft_params": None if draft is None else int(sum(np.size(x) for x in jax.tree.leaves(draft.params))),
        "first_call_s": first_s, "steady_calls_s": steady, "steady_s": statistics.median(steady),
        "overhead_s": first_s - statistics.median(steady), "first_call_events": first_events,
        "steady_backend_compiles": steady_events["backend_compiles"],
        "num_generated": [len(t) for t in res.tokens],
        "jax_compilation_cache_enabled": bool(jax.config.jax_enable_compilation_cache),
    }
    print(RESULT_PREFIX + json.dumps(out), flush=True)
    return 0


MODEL_FLAGS = ("hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab", "draft_layers", "batch", "prompt_len",
               "max_new_tokens", "steady_calls", "seed")


def run_worker(args, root: Path, depth: int, mode: str) -> dict:
    """One (depth, mode) arm in a fresh process with its own (empty) compilation caches."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--expect-root", str(root), "--depth", str(depth), "--mode", mode]
    for flag in MODEL_FLAGS:
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = worker_env(root)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"worker depth {depth} mode {mode} failed ({proc.returncode}):\n{tail}")
    out = json.loads(lines[-1][len(RESULT_PREFIX):])
    out["process_wall_s"] = wall
    return out


# ------------------------------------------------------------------------------------------------ the parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default="8,32,64", help="target layer counts; ratios are to the first")
    p.add_argument("--modes", default="ar,spec")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=0, help="MLP width (0: 3 x hidden)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--draft-layers", type=int, default=1)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repetitions", type=int, default=3, help="fresh processes per (depth, mode)")
    p.add_argument("--steady-calls", type=int, default=2, help="identical calls after the first (their median is steady state)")
    p.add_argument("--bar", type=float, default=1.5, help="deepest / shallowest first-call overhead must be <= this")
    p.add_argument("--rev", default=None, help="measure this revision (checked out into a temporary worktree); default: this checkout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per worker process")
    p.add_argument("--name", default="compile_depth")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--expect-root", help=argparse.SUPPRESS)
    p.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    depths = [int(d) for d in args.depths.split(",")]
    modes = args.modes.split(",")
    if not set(modes) <= {"ar", "spec"}:
        p.error(f"--modes takes ar and/or spec, not {args.modes}")

    with tree_for(args.rev) as (root, kind):
        bench = import_bench(root)
        tree = {"spec": args.rev or "working tree", "tree": kind, **describe_tree(root)}
        meta = {"machine": bench.machine(), "tree": tree, "dtype": "float32", "temperature": 0.0, "depths": depths, "modes": modes,
                "repetitions": args.repetitions, "bar": args.bar,
                "target": {k: getattr(args, k) for k in ("hidden", "heads", "kv_heads", "head_dim", "vocab", "seed")}
                | {"intermediate": args.intermediate or 3 * args.hidden, "tie_word_embeddings": False},
                "draft": {"layers": args.draft_layers, "config": "synthetic.draft_config_for(target.config, num_layers=...)",
                          "seed": args.seed + 1},
                "generate": {"batch": args.batch, "prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens,
                             "stop_token_ids": [], "steady_calls": args.steady_calls},
                "prompts": f"uniform random token ids (seed {args.seed})",
                "compilation_cache": "off (JAX_ENABLE_COMPILATION_CACHE=false, JAX_COMPILATION_CACHE_DIR unset)"}
        log(f"machine: {meta['machine']['cpu_model']} x{meta['machine']['cpu_cores']}, load {meta['machine']['load_average']}; "
            f"measuring {tree['label']} ({kind})")
        runs = {(mode, d): [] for mode in modes for d in depths}
        loads = []
        for rep in range(args.repetitions):
            for mode in modes:
                for d in depths:
                    loads.append(os.getloadavg()[0])
                    r = run_worker(args, root, d, mode)
                    runs[(mode, d)].append(r)
                    ev = r["first_call_events"]
                    log(f"  rep {rep + 1}/{args.repetitions} {mode} L={d}: first {r['first_call_s']:.2f}s steady {r['steady_s']:.3f}s "
                        f"overhead {r['overhead_s']:.2f}s (trace {ev['trace_s']:.2f} lower {ev['lower_s']:.2f} "
                        f"compile {ev['backend_compile_s']:.2f}, {ev['backend_compiles']} compiles); process {r['process_wall_s']:.1f}s")
    meta["load_average_end"] = list(os.getloadavg())
    meta["load_average_1min_per_worker"] = loads

    med = statistics.median
    rows = []
    for mode in modes:
        for d in depths:
            rs = runs[(mode, d)]
            ratio = [r["overhead_s"] / b["overhead_s"] for r, b in zip(rs, runs[(mode, depths[0])], strict=True)]
            ev = {k: med([r["first_call_events"][k] for r in rs]) for k in ("trace_s", "lower_s", "backend_compile_s")}
            rows.append({
                "mode": mode, "depth": d, "target_params": rs[0]["target_params"], "draft_params": rs[0]["draft_params"],
                "first_call_s": med([r["first_call_s"] for r in rs]), "steady_s": med([r["steady_s"] for r in rs]),
                "overhead_s": med([r["overhead_s"] for r in rs]), "ratio_to_first_depth": med(ratio),
                "ratio_min": min(ratio), "ratio_max": max(ratio), **ev,
                "backend_compiles": max(r["first_call_events"]["backend_compiles"] for r in rs),
                "persistent_cache_hits": sum(r["first_call_events"]["persistent_cache_hits"] for r in rs),
                "steady_backend_compiles": max(r["steady_backend_compiles"] for r in rs),
                "per_repetition": {"overhead_s": [r["overhead_s"] for r in rs], "ratio": ratio,
                                   "first_call_s": [r["first_call_s"] for r in rs], "steady_calls_s": [r["steady_calls_s"] for r in rs],
                                   "first_call_events": [r["first_call_events"] for r in rs],
                                   "build_s": [r["build_s"] for r in rs], "process_wall_s": [r["process_wall_s"] for r in rs]},
            })
    if any(r["persistent_cache_hits"] for r in rows):
        log("warning: a worker hit a persistent compilation cache; its overheads are not compile times")

    shallow, deep = depths[0], depths[-1]
    verdicts = [{"mode": mode, "ratio": r["ratio_to_first_depth"], "met": r["ratio_to_first_depth"] <= args.bar}
                for mode in modes for r in rows if r["mode"] == mode and r["depth"] == deep]
    label = tree["label"]
    table = bench.Table(
        f"First-call overhead of dj.generate against depth ({label})",
        ["mode", "layers", "target params (M)", "first call s", "steady call s", "overhead s", f"overhead / {shallow} layers",
         "min", "max", "jaxpr trace s", "MLIR lowering s", "XLA compile s", "compiles", "recompiles after first"],
        [[r["mode"], r["depth"], r["target_params"] / 1e6, r["first_call_s"], r["steady_s"], r["overhead_s"], r["ratio_to_first_depth"],
          r["ratio_min"], r["ratio_max"], r["trace_s"], r["lower_s"], r["backend_compile_s"], r["backend_compiles"],
          r["steady_backend_compiles"]] for r in rows],
        note=(f"overhead = first call - median of {args.steady_calls} identical later calls, each (depth, mode) in a fresh process, "
              f"persistent compilation cache off; medians over {args.repetitions} interleaved repetitions; overhead / {shallow} "
              f"layers = median of per-repetition ratios (min, max over repetitions); trace / lowering / compile = JAX's own "
              f"compile events summed over the first call (medians); compiles = backend compilations in the first call."),
    )
    bar_table = bench.Table(
        f"Bar: overhead at {deep} layers <= {args.bar:g} x overhead at {shallow} layers",
        ["mode", f"{deep} / {shallow} layers", "bar", "met"],
        [[v["mode"], v["ratio"], args.bar, "yes" if v["met"] else "no"] for v in verdicts],
    )
    intro = (f"Tree {label} ({tree['tree']}); random Qwen3 targets, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} KV "
             f"heads of {args.head_dim}, MLP {args.intermediate or 3 * args.hidden}, vocab {args.vocab}, untied, fp32; speculative "
             f"mode with a random {args.draft_layers}-layer DSpark draft; dj.generate of {args.batch} prompts of {args.prompt_len} "
             f"random ids, {args.max_new_tokens} new tokens, greedy; {meta['machine']['cpu_model']} ({meta['machine']['cpu_cores']} "
             f"cores), jax {meta['machine']['versions']['jax']}, load average {meta['machine']['load_average'][0]:.1f} at start, "
             f"{meta['load_average_end'][0]:.1f} at end.")
    bench.write_report(args.out, args.name, title=f"Compile overhead against depth ({label})", tables=[table, bar_table], meta=meta,
                       data={"rows": rows, "verdicts": verdicts}, intro=intro)
    print((Path(args.out) / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
