"""Continuous vs static batching on a mixed-length job (issue: batch jobs at full throughput).

The job: held-out-style prompts of every prompt set (chat-rendered, about 30 to 1,500 tokens), greedy, answers
ending at their own stop token or at `--max-new-tokens`, so rows finish at very different times. For each slot
count it times, interleaved (`bench.interleave`, median of `--repetitions` after one first call each):

* static: `generate(..., batch_size=S, batching="static")` over the prompts sorted by length (what
  `dspark-jax batch --batching static` does: groups of S similar lengths, each run to its slowest answer);
* continuous: `generate(..., batch_size=S)` over the prompts in file order (S slots refilled as answers end);

and, for the claim "a batch of 16 with continuous batching is no slower than 16 batch-1 calls", the first 16
prompts one `generate` call each against the same 16 through 16 continuous slots. It reports tokens/s, the
ratio, and the fraction of slot-rounds spent on finished or empty rows (paid for but producing nothing). Every
arm's answers are checked equal to batch-1 answers. Targets: the built-in target and the cost-inflated one
(`bench.inflate_target`). Results: benchmarks/results/continuous.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")

import numpy as np  # noqa: E402

import dspark_jax as dj  # noqa: E402
from dspark_jax import assets  # noqa: E402
from dspark_jax.tools import bench  # noqa: E402
from dspark_jax.training.corpus import default_prompt_dir, read_prompt_set  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def job_prompts(tok, n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    """`n` held-out-style prompts of about `lo` to `hi` tokens: a question of a
    prompt set (round robin over the sets; target lengths log-uniform over [lo, hi]), preceded, when it is shorter than its target length, by other
    questions of the same set as context ("few-shot" style), cut at whole questions, chat-rendered."""
    sets = [read_prompt_set(p) for p in sorted(default_prompt_dir().glob("*.jsonl"))]
    rng = np.random.default_rng(seed)
    goals = rng.permutation(np.geomspace(lo, hi, n).astype(int))  # log-uniform: mostly short, a long tail
    render = lambda text: tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                             tokenize=False), add_special_tokens=False)
    out = []
    for i, goal in enumerate(goals):
        texts = sets[i % len(sets)]
        question = texts[i // len(sets)]
        context, j = [], len(texts) - 1
        while len(render("\n\n".join(context + [question]))) < goal and j > 0:
            candidate = context + [texts[j]]
            if len(render("\n\n".join(candidate + [question]))) > hi:
                break
            context, j = candidate, j - 1
        out.append(render("\n\n".join(context + [question])))
    return out


def wasted(stats, slot_rounds: int) -> float:
    """Fraction of paid slot-rounds in which the slot produced nothing (finished, empty or padding rows)."""
    useful = sum(stats.rounds)
    return 1.0 - useful / slot_rounds if slot_rounds else 0.0


def run_target(label, target, draft, prompts, slot_counts, args) -> list[dict]:
    slot_counts = [S for S in slot_counts if not label.startswith("cost") or S in args.inflated_slots]
    common = dict(max_new_tokens=args.max_new_tokens, temperature=0.0, schedule=args.schedule)
    by_length = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    rows = []
    for S in slot_counts:
        arms = {
            "static": lambda S=S: dj.generate(target, draft, [prompts[i] for i in by_length], batch_size=S,
                                              batching="static", row_ids=by_length, **common),
            "continuous": lambda S=S: dj.generate(target, draft, prompts, batch_size=S, **common),
        }
        timings = bench.interleave(arms, args.repetitions, log=log)
        static, cont = timings["static"].result, timings["continuous"].result
        static_tokens = [None] * len(prompts)
        for j, i in enumerate(by_length):
            static_tokens[i] = static.tokens[j]
        tokens = sum(len(t) for t in cont.tokens)
        row = {
            "target": label, "slots": S, "prompts": len(prompts), "tokens": tokens,
            "static_tok_s": tokens / timings["static"].median_s,
            "continuous_tok_s": tokens / timings["continuous"].median_s,
            "static_wasted_slot_rounds": wasted(static.stats, static.stats.slot_rounds),
            "continuous_wasted_slot_rounds": wasted(cont.stats, cont.stats.slot_rounds),
            "identical_answers": static_tokens == cont.tokens,
            "tau": cont.stats.mean_acceptance_length,
            "timing": {k: t.summary() for k, t in timings.items()},
        }
        row["ratio"] = row["continuous_tok_s"] / row["static_tok_s"]
        log(f"{label} S={S}: static {row['static_tok_s']:.1f} tok/s, continuous {row['continuous_tok_s']:.1f} tok/s "
            f"({row['ratio']:.2f}x); wasted slot-rounds {row['static_wasted_slot_rounds']:.2f} vs "
            f"{row['continuous_wasted_slot_rounds']:.2f}")
        rows.append(row)
    return rows


def batch_one_row(label, target, draft, prompts, args) -> dict:
    first = prompts[:16]
    common = dict(max_new_tokens=args.max_new_tokens, temperature=0.0, schedule=args.schedule)
    arms = {
        "batch-1 calls": lambda: [dj.generate(target, draft, [p], **common) for p in first],
        "continuous 16": lambda: dj.generate(target, draft, first, batch_size=16, **common),
    }
    timings = bench.interleave(arms, args.repetitions, log=log)
    singles, cont = timings["batch-1 calls"].result, timings["continuous 16"].result
    tokens = sum(len(t) for t in cont.tokens)
    row = {"target": label, "prompts": 16, "tokens": tokens,
           "batch1_tok_s": tokens / timings["batch-1 calls"].median_s,
           "continuous_tok_s": tokens / timings["continuous 16"].median_s,
           "identical_answers": [r.tokens[0] for r in singles] == cont.tokens,
           "timing": {k: t.summary() for k, t in timings.items()}}
    row["ratio"] = row["continuous_tok_s"] / row["batch1_tok_s"]
    log(f"{label}: 16 batch-1 calls {row['batch1_tok_s']:.1f} tok/s, continuous 16 slots {row['continuous_tok_s']:.1f} "
        f"tok/s ({row['ratio']:.2f}x)")
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--min-prompt-tokens", type=int, default=30)
    p.add_argument("--max-prompt-tokens", type=int, default=1500)
    p.add_argument("--batch-one-targets", default="built-in", help="targets (by label prefix) for the batch-1 comparison")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--slots", default="8,16,32")
    p.add_argument("--inflated-slots", default="16", help="slot counts run on the cost-inflated target")
    p.add_argument("--repetitions", type=int, default=2)
    p.add_argument("--inflate-mb", type=float, default=200.0, help="0 skips the cost-inflated target")
    p.add_argument("--inflated-only", action="store_true", help="only the cost-inflated target")
    p.add_argument("--tag", default="", help="suffix of the result files (continuous{tag}.json/.md)")
    p.add_argument("--schedule", default="fixed", choices=("fixed", "auto"))
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)

    target = dj.load_target(assets.TARGET, dtype="float32")
    draft = dj.load_draft(assets.DSPARK_DRAFT, dtype="float32")
    prompts = job_prompts(target.tokenizer, args.prompts, args.min_prompt_tokens, args.max_prompt_tokens)
    lengths = [len(q) for q in prompts]
    machine = bench.machine()
    log(f"{machine['cpu_model']} x{machine['cpu_cores']}, load {machine['load_average']}; {len(prompts)} prompts of "
        f"{min(lengths)}-{max(lengths)} tokens (mean {np.mean(lengths):.0f})")
    slots = [int(x) for x in args.slots.split(",")]
    args.inflated_slots = [int(x) for x in args.inflated_slots.split(",")]
    targets = [] if args.inflated_only else [("built-in", target, draft)]
    if args.inflate_mb > 0:
        big = bench.inflate_target(target, args.inflate_mb)
        targets.append((f"cost-inflated (+{args.inflate_mb:.0f} MB)", big, bench.retarget_draft(draft, big)))
    rows, single = [], []
    for label, t, d in targets:
        rows += run_target(label, t, d, prompts, slots, args)
        if any(label.startswith(x) for x in args.batch_one_targets.split(",")):
            single.append(batch_one_row(label, t, d, prompts, args))
    report = {"machine": machine, "load_average_end": list(os.getloadavg()), "prompt_lengths": lengths,
              "settings": vars(args) | {"out": None}, "rows": rows, "batch_one": single}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"continuous{args.tag}.json").write_text(json.dumps(report, indent=1))
    lines = [
        "# Continuous vs static batching (benchmarks/continuous.py)", "",
        f"Machine: {machine['cpu_model']} x{machine['cpu_cores']}; load average at start {machine['load_average']}, at end "
        f"{report['load_average_end']}. DSpark draft, greedy, fp32, schedule={args.schedule}, {len(prompts)} prompts of "
        f"{min(lengths)}-{max(lengths)} tokens (mean {np.mean(lengths):.0f}), up to {args.max_new_tokens} new tokens. "
        f"Interleaved arms, median of {args.repetitions}.", "",
        "| target | slots | static tok/s | continuous tok/s | continuous / static | wasted slot-rounds static | "
        "wasted slot-rounds continuous | answers identical |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['target']} | {r['slots']} | {r['static_tok_s']:.1f} | {r['continuous_tok_s']:.1f} | "
                     f"{r['ratio']:.2f}x | {r['static_wasted_slot_rounds']:.0%} | {r['continuous_wasted_slot_rounds']:.0%} | "
                     f"{r['identical_answers']} |")
    lines += ["", "| target | 16 batch-1 calls tok/s | continuous, 16 slots tok/s | ratio | answers identical |",
              "| --- | --- | --- | --- | --- |"]
    for r in single:
        lines.append(f"| {r['target']} | {r['batch1_tok_s']:.1f} | {r['continuous_tok_s']:.1f} | {r['ratio']:.2f}x | "
                     f"{r['identical_answers']} |")
    (out / f"continuous{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
