"""Runtime A/B between two trees of this repository, in one run, arms interleaved (benchmarks.md).

"Is the new code's decode no slower than the old one's?" A change to the library internals is checked by
running the same generation with both versions side by side: the base version (a commit, checked out into a
temporary `git worktree add --detach`, removed at the end) and the head version (by default the current
checkout, uncommitted edits included; or another directory; or another commit, also checked out into a
temporary worktree).

Two long-lived worker processes, one per side, each with `PYTHONPATH` set to its tree (each checks that the
`dspark_jax` it imported lives in that tree), build the same seeded random Qwen3 target (fp32, untied head,
~58M parameters at the defaults) and a random one-layer DSpark draft. The workers use only APIs that exist
both before and after the engine/proposers/testing/tools refactor: `dj.Target.random`, `dj.generate`,
`dj.Qwen3Config` (else `dspark_jax.config.Qwen3Config`), and `synthetic.random_draft` /
`synthetic.draft_config_for` (imported from `dspark_jax.testing` or, before the move, from `dspark_jax`). Each
worker imports the library from its tree only (the editable install's import hook is removed, and the loaded
library modules are checked at the end). They answer timing requests over stdin/stdout, one JSON object per
line; the parent sends both the same prompts (uniform random token ids, seeded).

Per (mode, batch) with mode `ar` (`dj.generate(target, None, ...)`) and `spec` (`dj.generate(target, draft,
...)`), greedy, no stop tokens: every program is compiled by warm-up calls first (their first-call overhead is
reported apart), then each repetition times base then head (A B A B ...), each side a long and a short
generation of the same prompts. A decode iteration (an AR step, or a speculative round) costs
`(t_long - t_short) / (rounds_long - rounds_short)`, so prefill cancels (as in `ar_decode.py`); the default
budgets (128 and 65 new tokens) fall into the same power-of-two bucket of `dj.generate`, i.e. the same
compiled program and cache capacity. Quoted: medians over repetitions of the per-repetition values, and
`head / base` per (mode, batch) with its spread over repetitions.

    python benchmarks/ab_runtime.py --base HEAD~1                          # current checkout vs HEAD~1
    python benchmarks/ab_runtime.py --base main --head ../other-checkout --batch-sizes 1,16 --repetitions 5
    python benchmarks/ab_runtime.py --base HEAD~3 --repetitions 1 --layers 2 --hidden 128 --vocab 1024 \\
        --new-tokens 32,17 --out /tmp/ab_smoke                             # plumbing check, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
# The library code whose version an A/B compares (a dirty tree is labelled as such).
LIBRARY_PATHS = ("dspark_jax", "converters")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ git trees


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def describe_tree(root: Path) -> dict:
    """The commit a tree is at and whether its library code differs from that commit (tracked files)."""
    commit = git("rev-parse", "--short", "HEAD", cwd=root)
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", *LIBRARY_PATHS, cwd=root))
    return {"commit": commit, "dirty": dirty, "label": commit + ("+dirty" if dirty else "")}


@contextlib.contextmanager
def worktree(rev: str):
    """A detached `git worktree` of `rev` in a temporary directory, removed (with its bookkeeping) on exit."""
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    tmp = Path(tempfile.mkdtemp(prefix="dspark_ab_"))
    path = tmp / "tree"
    git("worktree", "add", "--detach", str(path), commit)
    try:
        yield path
    finally:
        try:
            git("worktree", "remove", "--force", str(path))
        except subprocess.CalledProcessError as e:  # leave the repo usable even if removal fails
            log(f"git worktree remove failed ({e.stderr.strip()}); pruning")
        shutil.rmtree(tmp, ignore_errors=True)
        git("worktree", "prune")


@contextlib.contextmanager
def tree_for(spec: str | None):
    """The directory holding the code of `spec`: None = this checkout, an existing directory = itself, else a revision."""
    if spec is None:
        yield REPO, "current checkout"
    elif Path(spec).is_dir():
        yield Path(spec).resolve(), "directory"
    else:
        with worktree(spec) as path:
            yield path, f"worktree of {spec}"


def worker_env(root: Path) -> dict:
    """The environment of a worker that must import the library from `root` (ahead of the editable install)."""
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def pin_library_root(expect_root: str) -> str:
    """Before any library import: import `dspark_jax` / `converters` from `expect_root` only.

    `PYTHONPATH` puts the tree ahead of the editable install, but the editable install's import hook (appended to
    `sys.meta_path`) would still answer for a module the tree lacks (e.g. `dspark_jax.testing` in a tree from
    before the refactor), silently mixing two versions; the hook is removed here. -> `dspark_jax`'s file,
    relative to the root; fails if it is imported from elsewhere.
    """
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    sys.path[:] = [p for p in sys.path if "__editable__" not in p]
    root = Path(expect_root).resolve()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import dspark_jax

    path = Path(dspark_jax.__file__).resolve()
    if not path.is_relative_to(root):
        raise SystemExit(f"dspark_jax was imported from {path}, not from the tree {root}")
    return str(path.relative_to(root))


def foreign_modules(expect_root: str) -> list[str]:
    """Loaded library modules (`dspark_jax.*`, `converters.*`) whose files are not in `expect_root` (should be none)."""
    root = Path(expect_root).resolve()
    return sorted(name for name, m in list(sys.modules.items())
                  if name.split(".")[0] in LIBRARY_PATHS and getattr(m, "__file__", None)
                  and not Path(m.__file__).resolve().is_relative_to(root))


def import_synthetic():
    """`synthetic` from its place after the refactor (`dspark_jax.testing`) or before it (`dspark_jax`)."""
    try:
        from dspark_jax.testing import synthetic
    except ModuleNotFoundError as e:  # only a missing module falls back, not a broken one
        if e.name not in ("dspark_jax.testing", "dspark_jax.testing.synthetic"):
            raise
        from dspark_jax import synthetic
    return synthetic


def qwen3_config_class():
    """`Qwen3Config`: the package's top-level export (before and after the refactor), else `dspark_jax.config`'s."""
    import dspark_jax

    if hasattr(dspark_jax, "Qwen3Config"):
        return dspark_jax.Qwen3Config
    from dspark_jax.config import Qwen3Config

    return Qwen3Config


def import_bench(root: Path):
    """The report helpers (`dspark_jax/bench.py`, or `dspark_jax/tools/bench.py` after the refactor) of the tree `root`.

    The parent takes them from a tree it measures (ahead of the editable install), so a report can be written
    while another checkout is mid-edit.
    """
    pin_library_root(str(root))
    try:
        from dspark_jax import bench
    except ImportError:
        from dspark_jax.tools import bench
    return bench


# ------------------------------------------------------------------------------------------------ the worker


def target_config(args):
    return qwen3_config_class()(
        model_type="qwen3", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate or 3 * args.hidden,
        num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
        tie_word_embeddings=False, max_position_embeddings=4096,
    )


def worker(args) -> int:
    """Answer JSON-line requests on the original stdout; everything else printed goes to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    library_file = pin_library_root(args.expect_root)

    import jax
    import numpy as np

    import dspark_jax as dj

    synthetic = import_synthetic()
    t0 = time.perf_counter()
    target = dj.Target.random(target_config(args), dtype="float32", seed=args.seed)
    draft = synthetic.random_draft(target, synthetic.draft_config_for(target.config, num_layers=args.draft_layers), seed=args.seed + 1)
    build_s = time.perf_counter() - t0

    def count(params) -> int:
        return int(sum(np.size(x) for x in jax.tree.leaves(params)))

    proto.write(json.dumps({"ready": True, "library_file": library_file, "build_s": build_s,
                            "target_params": count(target.params), "draft_params": count(draft.params)}) + "\n")

    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            break
        if req["op"] == "check":
            proto.write(json.dumps({"foreign_modules": foreign_modules(args.expect_root)}) + "\n")
            continue
        t0 = time.perf_counter()
        res = dj.generate(target, draft if req["mode"] == "spec" else None, req["prompts"], max_new_tokens=req["max_new_tokens"],
                          temperature=0.0, stop_token_ids=[], **json.loads(args.generate_kwargs))
        wall = time.perf_counter() - t0
        rounds = getattr(getattr(res, "stats", None), "rounds", None)
        proto.write(json.dumps({"wall_s": wall, "rounds": max(rounds) if rounds else None,
                                "num_generated": [len(t) for t in res.tokens], "tokens": res.tokens}) + "\n")
    return 0


def worker_argv(args) -> list[str]:
    """The model flags a worker needs, as given to the parent."""
    out = []
    for flag in ("layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab", "draft_layers", "seed"):
        out += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return out


class Worker:
    """A worker process for one tree: `ask(request) -> reply`, both JSON objects."""

    def __init__(self, name: str, root: Path, args, generate_kwargs: str = "{}"):
        self.name = name
        self.log_file = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--expect-root", str(root), *worker_argv(args),
               "--generate-kwargs", generate_kwargs]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log_file, text=True,
                                     env=worker_env(root), cwd=tempfile.gettempdir())
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log_file.seek(0)
            tail = "".join(self.log_file.readlines()[-30:])
            raise RuntimeError(f"{self.name} worker exited ({self.proc.returncode}); its stderr ends with:\n{tail}")
        return json.loads(line)

    def ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


# ------------------------------------------------------------------------------------------------ the parent


def measure(workers: dict[str, Worker], modes, batch_sizes, prompts, n_long: int, n_short: int, repetitions: int) -> list[dict]:
    """Warm up every program (one long and one short call each), then repetitions of base-then-head per (mode, batch)."""
    cases = [(mode, B) for mode in modes for B in batch_sizes]
    first = {}
    for mode, B in cases:
        for side, w in workers.items():
            first[(mode, B, side)] = [w.ask({"op": "generate", "mode": mode, "prompts": prompts[:B], "max_new_tokens": n})["wall_s"]
                                      for n in (n_long, n_short)]
            log(f"  warm-up {mode} B={B} {side}: first calls {first[(mode, B, side)][0]:.2f}s (long) / "
                f"{first[(mode, B, side)][1]:.2f}s (short)")

    samples = {case: {side: [] for side in workers} for case in cases}
    loads = []
    for rep in range(repetitions):
        for mode, B in cases:
            for side, w in workers.items():  # A B A B ...: base, then head
                long = w.ask({"op": "generate", "mode": mode, "prompts": prompts[:B], "max_new_tokens": n_long})
                short = w.ask({"op": "generate", "mode": mode, "prompts": prompts[:B], "max_new_tokens": n_short})
                samples[(mode, B)][side].append((long, short))
        loads.append(os.getloadavg()[0])
        log(f"  rep {rep + 1}/{repetitions} (load {loads[-1]:.1f}): " + "  ".join(
            f"{mode} B={B} " + "/".join(f"{1e3 * step_s(samples[(mode, B)][s][-1], n_long, n_short):.1f}" for s in workers) + " ms"
            for mode, B in cases))

    med = statistics.median
    rows = []
    for mode, B in cases:
        step = {side: [step_s(pair, n_long, n_short) for pair in samples[(mode, B)][side]] for side in workers}
        e2e = {side: [pair[0]["wall_s"] for pair in samples[(mode, B)][side]] for side in workers}
        ratio = [h / b for h, b in zip(step["head"], step["base"], strict=True)]
        e2e_ratio = [h / b for h, b in zip(e2e["head"], e2e["base"], strict=True)]
        last = {side: samples[(mode, B)][side][-1] for side in workers}
        row = {"mode": mode, "batch": B, "ratio_head_over_base": med(ratio), "ratio_min": min(ratio), "ratio_max": max(ratio),
               "e2e_ratio_head_over_base": med(e2e_ratio),
               "tokens_equal": last["base"][0]["tokens"] == last["head"][0]["tokens"],
               "per_repetition": {"ratio": ratio, "e2e_ratio": e2e_ratio, "load_average_1min": loads}}
        for side in workers:
            long, short = last[side]
            row[f"{side}_step_ms"] = 1e3 * med(step[side])
            row[f"{side}_decode_tok_s"] = B / med(step[side]) * (1 if mode == "ar" else mean_tokens_per_round(long, short, B))
            row[f"{side}_e2e_long_s"] = med(e2e[side])
            row[f"{side}_rounds"] = {"long": long["rounds"], "short": short["rounds"]}
            row[f"{side}_first_call_s"] = {"long": first[(mode, B, side)][0], "short": first[(mode, B, side)][1]}
            row[f"{side}_first_call_overhead_s"] = first[(mode, B, side)][0] - med(e2e[side])
            row["per_repetition"][f"{side}_step_s"] = step[side]
            row["per_repetition"][f"{side}_times_s"] = [[p[0]["wall_s"], p[1]["wall_s"]] for p in samples[(mode, B)][side]]
        rows.append(row)
    return rows


def iterations(reply: dict, n: int) -> int:
    """Loop iterations after prefill of a generation: reported rounds, else n - 1 AR steps (the first token comes from prefill)."""
    return reply["rounds"] if reply["rounds"] is not None else n - 1


def step_s(pair, n_long: int, n_short: int) -> float:
    long, short = pair
    return (long["wall_s"] - short["wall_s"]) / (iterations(long, n_long) - iterations(short, n_short))


def mean_tokens_per_round(long: dict, short: dict, B: int) -> float:
    """Tokens per row per speculative round between the short and the long run (tau, roughly 1 for a random draft)."""
    return (sum(long["num_generated"]) - sum(short["num_generated"])) / B / (long["rounds"] - short["rounds"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="the revision to compare against (checked out into a temporary worktree)")
    p.add_argument("--head", default=None, help="a directory holding a checkout, or a revision; default: this checkout as it is")
    p.add_argument("--modes", default="ar,spec")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--repetitions", type=int, default=5)
    p.add_argument("--new-tokens", default="128,65", help="long,short new-token budgets (default: one power-of-two bucket)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=0, help="MLP width (0: 3 x hidden)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--draft-layers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=0.05, help="'no worse' means head/base <= 1 + tolerance")
    p.add_argument("--name", default="ab_runtime")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--head-kwargs", default="{}", help='extra dj.generate keyword arguments (JSON) for the head tree only, '
                   'e.g. \'{"unroll_layers": true}\'')
    p.add_argument("--generate-kwargs", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--expect-root", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if not args.base:
        p.error("--base is required")

    import numpy as np

    modes = args.modes.split(",")
    if not set(modes) <= {"ar", "spec"}:
        p.error(f"--modes takes ar and/or spec, not {args.modes}")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    n_long, n_short = (int(n) for n in args.new_tokens.split(","))
    if not n_long > n_short >= 1:
        p.error("--new-tokens wants long > short >= 1")
    prompts = np.random.default_rng(args.seed).integers(0, args.vocab, (max(batch_sizes), args.prompt_len)).tolist()

    meta = {"dtype": "float32", "temperature": 0.0, "repetitions": args.repetitions,
            "new_tokens": {"long": n_long, "short": n_short}, "prompt_len": args.prompt_len, "batch_sizes": batch_sizes,
            "modes": modes, "tolerance": args.tolerance,
            "target": {k: getattr(args, k) for k in ("layers", "hidden", "heads", "kv_heads", "head_dim", "vocab", "seed")}
            | {"intermediate": args.intermediate or 3 * args.hidden, "tie_word_embeddings": False},
            "draft": {"layers": args.draft_layers, "config": "synthetic.draft_config_for(target.config, num_layers=...)",
                      "seed": args.seed + 1},
            "prompts": f"uniform random token ids (seed {args.seed}), {args.prompt_len} per row; batch B uses the first B rows",
            "stop_token_ids": []}

    with contextlib.ExitStack() as stack:
        base_root, base_kind = stack.enter_context(tree_for(args.base))
        head_root, head_kind = stack.enter_context(tree_for(args.head))
        bench = import_bench(head_root)
        meta = {"machine": bench.machine()} | meta
        log(f"machine: {meta['machine']['cpu_model']} x{meta['machine']['cpu_cores']}, load {meta['machine']['load_average']}")
        sides = {"base": (args.base, base_root, base_kind), "head": (args.head or "working tree", head_root, head_kind)}
        workers = {}
        for side, (spec, root, kind) in sides.items():
            log(f"{side}: {spec} ({kind}, {describe_tree(root)['label']}): starting its worker")
            workers[side] = w = Worker(side, root, args, args.head_kwargs if side == "head" else "{}")
            stack.callback(w.close)
            meta[side] = {"spec": spec, "tree": kind, **describe_tree(root), "library_file": w.info["library_file"],
                          "target_params": w.info["target_params"], "draft_params": w.info["draft_params"],
                          "build_s": w.info["build_s"]}
        if meta["base"]["target_params"] != meta["head"]["target_params"]:
            log(f"warning: the sides build targets of different sizes ({meta['base']['target_params']} vs {meta['head']['target_params']})")
        log(f"target {meta['head']['target_params'] / 1e6:.1f}M params, draft {meta['head']['draft_params'] / 1e6:.1f}M; "
            f"{args.repetitions} repetitions, budgets {n_long}/{n_short}")
        rows = measure(workers, modes, batch_sizes, prompts, n_long, n_short, args.repetitions)
        for side, w in workers.items():
            foreign = w.ask({"op": "check"})["foreign_modules"]
            if foreign:
                raise RuntimeError(f"the {side} worker imported library modules from outside its tree: {foreign}")
    meta["load_average_end"] = list(os.getloadavg())

    for r in rows:
        r["no_worse"] = r["ratio_head_over_base"] <= 1 + args.tolerance
    base_label, head_label = meta["base"]["label"], meta["head"]["label"]
    table = bench.Table(
        f"Decode time per iteration, head ({head_label}) vs base ({base_label}), interleaved",
        ["mode", "batch", "base ms/iter", "head ms/iter", "head / base", "min", "max", f"<= {1 + args.tolerance:g}",
         "e2e head / base", "base decode tok/s", "head decode tok/s", "same tokens", "base first-call s", "head first-call s"],
        [[r["mode"], r["batch"], r["base_step_ms"], r["head_step_ms"], r["ratio_head_over_base"], r["ratio_min"], r["ratio_max"],
          "yes" if r["no_worse"] else "NO", r["e2e_ratio_head_over_base"], r["base_decode_tok_s"], r["head_decode_tok_s"],
          "yes" if r["tokens_equal"] else "no", r["base_first_call_overhead_s"], r["head_first_call_overhead_s"]]
         for r in rows],
        note=(f"iteration = one AR step (ar) or one speculative round with a random draft (spec); ms/iter = (t_long - t_short) / "
              f"(rounds_long - rounds_short) for {n_long} and {n_short} new tokens, median over {args.repetitions} repetitions; "
              "head / base = median of per-repetition ratios (min, max over repetitions); e2e = the long generation's wall time, "
              "prefill included; same tokens = identical greedy outputs of the long run; first-call s = the long generation's first call "
              "(a warm-up before the repetitions: compilation and one run) minus its median in the repetitions."),
    )
    intro = (f"base `{args.base}` = {base_label} ({meta['base']['tree']}), head = {head_label} ({meta['head']['tree']}); "
             f"random Qwen3 target {meta['head']['target_params'] / 1e6:.1f}M params ({args.layers} layers, hidden {args.hidden}, "
             f"vocab {args.vocab}, untied, fp32), random DSpark draft ({args.draft_layers} layer, "
             f"{meta['head']['draft_params'] / 1e6:.1f}M params); greedy, no stop tokens, prompts of {args.prompt_len} random ids; "
             f"{meta['machine']['cpu_model']} ({meta['machine']['cpu_cores']} cores), jax {meta['machine']['versions']['jax']}, "
             f"load average {meta['machine']['load_average'][0]:.1f} at start, {meta['load_average_end'][0]:.1f} at end; "
             f"one worker process per side, requests alternated base/head.")
    json_path, md_path = bench.write_report(args.out, args.name, title="Runtime A/B: head vs base", tables=[table], meta=meta,
                                            data={"rows": rows}, intro=intro)
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
