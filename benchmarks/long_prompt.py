"""Long prompts: peak memory and prefill speed at 2k, 8k and 16k prompt tokens, before and after chunked prefill.

A random 2-layer, 64-wide Qwen3 (the shape of the issue that asked for chunked prefill), fp32, batch 1, one
generated token (`dj.generate(..., max_new_tokens=1)`: prefill plus the first sampled token). Every
(tree, length) runs in a fresh process; its peak resident memory is `ru_maxrss` of that process, its prefill
time the median of 3 calls after the compiling first call, prefill tokens/s = prompt tokens / that time. The
"before" tree is a git revision checked out into a temporary worktree (the workers import only from their
tree, see ab_runtime.py). A worker that runs out of memory or time is reported as failed.

    python benchmarks/long_prompt.py --base 24e5351         # results/long_prompt.{json,md}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_runtime import describe_tree, import_bench, pin_library_root, qwen3_config_class, tree_for, worker_env  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PREFIX = "LONG_PROMPT_RESULT "


def worker(args) -> int:
    pin_library_root(args.expect_root)
    import numpy as np

    import dspark_jax as dj

    cfg = qwen3_config_class()(model_type="qwen3", vocab_size=4096, hidden_size=64, intermediate_size=192, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=False,
                               max_position_embeddings=32768)
    target = dj.Target.random(cfg, dtype="float32", seed=0)
    prompt = np.random.default_rng(0).integers(0, 4096, args.length).tolist()
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        dj.generate(target, None, [prompt], max_new_tokens=1, stop_token_ids=[])
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(PREFIX + json.dumps({"first_s": times[0], "prefill_s": statistics.median(times[1:]), "peak_rss_bytes": peak}))
    return 0


def run_one(root: Path, length: int, timeout: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--expect-root", str(root), "--length", str(length)]
    try:
        p = subprocess.run(cmd, env=worker_env(root), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout} s"}
    for line in p.stdout.splitlines():
        if line.startswith(PREFIX):
            return {"ok": True, **json.loads(line[len(PREFIX):])}
    tail = (p.stderr.strip().splitlines() or ["?"])[-1][:200]
    return {"ok": False, "error": f"exit {p.returncode}: {tail}"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="24e5351", help="the revision before chunked prefill")
    p.add_argument("--lengths", default="2048,8192,16000")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--expect-root", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    lengths = [int(x) for x in args.lengths.split(",")]
    rows, data = [], {}
    with contextlib.ExitStack() as stack:
        trees = {"before": stack.enter_context(tree_for(args.base))[0], "after": stack.enter_context(tree_for(None))[0]}
        labels = {side: describe_tree(root)["label"] for side, root in trees.items()}
        for length in lengths:
            for side, root in trees.items():
                r = run_one(root, length, args.timeout)
                data[f"{side}/{length}"] = r
                print(f"{side} {labels[side]} {length}: {r}", file=sys.stderr, flush=True)
                if r["ok"]:
                    rows.append([side, labels[side], length, r["peak_rss_bytes"] / 2**30, length / r["prefill_s"], r["first_s"], "ok"])
                else:
                    rows.append([side, labels[side], length, None, None, None, r["error"]])
        bench = import_bench(trees["after"])
    machine = bench.machine()
    table = bench.Table(
        "Prefill of one prompt (2 layers, hidden 64, fp32, batch 1): peak process memory and prefill speed",
        ["tree", "commit", "prompt tokens", "peak RSS GiB", "prefill tok/s", "first call s", "status"], rows,
        note="peak RSS of a fresh process (model, compilation and buffers included); tok/s from the median of 3 "
             "calls after the first; chunk 512 after",
    )
    bench.write_report(args.out, "long_prompt", title="Long prompts before and after chunked prefill", tables=[table],
                       meta={"machine": machine, "settings": vars(args)}, data=data)
    print(table.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
