"""Prompt lookup on the built-in target: lossless (greedy output equals AR, prompt by prompt), its tau on
held-out code and other prompts, and batch-1 speed against AR and the DSpark draft in one interleaved run.

Prompts: the held-out prompts of each set (`assets/heldout_prompts.jsonl`, the same as
`benchmarks/trained_pair.py`), chat template, greedy, K = 7 for both proposers. Speed arms decode the same
code prompts one at a time with `dj.generate` (prefill included), A B C A B C ..., compile time apart.

    python benchmarks/prompt_lookup.py                          # writes results/prompt_lookup.{json,md}
    python benchmarks/prompt_lookup.py --num-prompts 4 --repetitions 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import dspark_jax as dj  # noqa: E402
from dspark_jax import assets  # noqa: E402
from dspark_jax.tools import bench  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CODE_SETS = ("humaneval", "mbpp")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=8, help="held-out prompts per set")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--speed-prompts", type=int, default=4)
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)

    target = dj.load_target(assets.TARGET, dtype="float32")
    proposers = {"prompt lookup": dj.prompt_lookup(draft_length=7, max_ngram=3),
                 "DSpark": dj.load_draft(assets.DSPARK_DRAFT, dtype="float32")}
    tok = target.tokenizer
    sets: dict[str, list[list[int]]] = {}
    for line in (assets.ROOT / "heldout_prompts.jsonl").read_text().splitlines():
        record = json.loads(line)
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": record["turns"][0]}], add_generation_prompt=True))
        sets.setdefault(record["set"], []).append(ids)
    sets = {name: ps[: args.num_prompts] for name, ps in sets.items()}
    machine = bench.machine()
    log(f"{machine['cpu_model']} x{machine['cpu_cores']}, load {machine['load_average']}")

    rows, data = [], {}
    for name, prompts in sets.items():
        ar = dj.generate(target, None, prompts, max_new_tokens=args.max_new_tokens)
        row = [name, len(prompts)]
        for label, proposer in proposers.items():
            r = dj.generate(target, proposer, prompts, max_new_tokens=args.max_new_tokens)
            same = sum(a == b for a, b in zip(r.tokens, ar.tokens, strict=True))
            row += [r.stats.mean_acceptance_length, r.stats.draft_tokens_per_proposal, f"{same}/{len(prompts)}"]
            data[f"{name}/{label}"] = {"tau": r.stats.mean_acceptance_length, "identical": same,
                                       "prefix_survival": r.stats.prefix_survival}
        rows.append(row)
        log(f"{name}: {row}")
    acceptance = bench.Table(
        "Greedy, held-out prompts: tau (bonus included), mean drafts proposed per round, outputs identical to AR",
        ["set", "prompts", "lookup tau", "lookup proposed", "lookup = AR", "DSpark tau", "DSpark proposed", "DSpark = AR"],
        rows,
    )

    code = [q for s in CODE_SETS for q in sets.get(s, [])][: args.speed_prompts]

    def arm(proposer):
        return lambda: [dj.generate(target, proposer, [q], max_new_tokens=args.max_new_tokens) for q in code]

    timings = bench.interleave({"AR": arm(None)} | {k: arm(v) for k, v in proposers.items()}, args.repetitions, log=log)
    ar_tokens = sum(len(r.tokens[0]) for r in timings["AR"].result)
    ar_tps = ar_tokens / timings["AR"].median_s
    speed_rows = [["AR", ar_tps, 1.0, 1.0, timings["AR"].compile_s]]
    for label in proposers:
        t = timings[label]
        tokens = sum(len(r.tokens[0]) for r in t.result)
        acc = [x for r in t.result for x in r.stats.acceptance_lengths[0]]
        speed_rows.append([label, tokens / t.median_s, tokens / t.median_s / ar_tps, sum(acc) / max(1, len(acc)), t.compile_s])
    speed = bench.Table(
        f"Batch-1 speed on {len(code)} held-out code prompts (greedy, {args.max_new_tokens} new tokens max, median of "
        f"{args.repetitions} interleaved repetitions)",
        ["arm", "tok/s", "speedup vs AR", "tau", "compile s"],
        speed_rows,
    )
    meta = {"machine": machine, "settings": vars(args) | {"K": 7, "max_ngram": 3, "dtype": "float32", "temperature": 0.0}}
    bench.write_report(args.out, "prompt_lookup", title="Prompt lookup on the built-in target", tables=[acceptance, speed],
                       meta=meta, data=data)
    print(acceptance.markdown())
    print(speed.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
