"""What the coupled sampler costs in acceptance: tau under sampler="coupled" vs sampler="rejection" at T = 1.

The built-in target with each built-in draft (DSpark, DFlash, EAGLE-3), `--prompts` chat-rendered prompts
(the first ones) of every prompt set (`training.corpus.default_prompt_dir()`), `--new-tokens` tokens each,
temperature 1, fixed rounds of the draft's whole block (so both samplers verify the same number of drafts per
round), one `generate` call per (draft, set, sampler, seed) over all the set's prompts, `--seeds` seeds pooled.
tau = the mean acceptance length of `GenerationStats` (bonus included).

It also checks what the coupled sampler promises: every coupled speculative answer equals the coupled plain
decoding answer of the same seed (`identical` counts the rows).

    python benchmarks/sampler_coupled.py
    python benchmarks/sampler_coupled.py --prompts 4 --new-tokens 32 --seeds 1

Results: benchmarks/results/sampler_coupled.json (the table printed here goes into sampler_coupled.md) and, with
`--timing`, sampler_coupled_timing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import dspark_jax as dj  # noqa: E402
from dspark_jax import assets  # noqa: E402
from dspark_jax.tools import bench  # noqa: E402
from dspark_jax.training.corpus import default_prompt_dir, read_prompt_set  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DRAFTS = {"dspark": assets.DSPARK_DRAFT, "dflash": assets.DFLASH_DRAFT, "eagle3": assets.ROOT / "eagle3_draft"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rounded(row: dict) -> dict:
    return {k: bench.rounded(v) for k, v in row.items()}


def pooled_tau(results) -> float:
    lengths = [x for r in results for row in r.stats.acceptance_lengths for x in row]
    return sum(lengths) / len(lengths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=6, help="prompts per prompt set")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--drafts", default="dspark,dflash,eagle3")
    parser.add_argument("--out", default=str(RESULTS / "sampler_coupled"))
    parser.add_argument("--timing", action="store_true",
                        help="instead: interleaved warm timings of both samplers (DSpark draft, the gsm8k prompts, "
                             "fixed rounds), ms per round, into <out>_timing.json")
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args()
    if args.timing:
        return timing(args)

    target = dj.load_target(assets.TARGET, dtype="float32")
    tok = target.tokenizer
    render = lambda text: tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                             tokenize=False), add_special_tokens=False)
    sets = {p.stem: [render(t) for t in read_prompt_set(p)[: args.prompts]] for p in sorted(default_prompt_dir().glob("*.jsonl"))}
    common = dict(max_new_tokens=args.new_tokens, temperature=1.0)
    rows = []
    for name in args.drafts.split(","):
        draft = dj.load_draft(DRAFTS[name], dtype="float32")
        for set_name, prompts in sets.items():
            runs = {"coupled": [], "rejection": []}
            walls = {"coupled": 0.0, "rejection": 0.0}
            identical = 0
            for seed in range(args.seeds):
                plain = dj.generate(target, None, prompts, seed=seed, sampler="coupled", **common).tokens
                for sampler in ("coupled", "rejection"):
                    t0 = time.perf_counter()
                    r = dj.generate(target, draft, prompts, seed=seed, sampler=sampler, schedule="fixed", **common)
                    walls[sampler] += time.perf_counter() - t0
                    runs[sampler].append(r)
                    if sampler == "coupled":
                        identical += sum(a == b for a, b in zip(r.tokens, plain))
            tau = {s: pooled_tau(runs[s]) for s in runs}
            row = {"draft": name, "set": set_name, "prompts": len(prompts), "seeds": args.seeds,
                   "tau_coupled": tau["coupled"], "tau_rejection": tau["rejection"],
                   "ratio": tau["coupled"] / tau["rejection"],
                   "rounds_coupled": sum(sum(r.stats.rounds) for r in runs["coupled"]),
                   "rounds_rejection": sum(sum(r.stats.rounds) for r in runs["rejection"]),
                   "identical_to_plain": f"{identical}/{len(prompts) * args.seeds}",
                   "wall_s_coupled": walls["coupled"], "wall_s_rejection": walls["rejection"]}
            log(json.dumps(rounded(row)))
            rows.append(row)

    meta = {"machine": bench.machine(), "prompts_per_set": args.prompts, "new_tokens": args.new_tokens,
            "seeds": args.seeds, "temperature": 1.0, "schedule": "fixed"}
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": [rounded(r) for r in rows]}, indent=1) + "\n")
    lines = ["| draft | prompt set | tau coupled | tau rejection | coupled / rejection | coupled = plain AR |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['draft']} | {r['set']} | {r['tau_coupled']:.2f} | {r['tau_rejection']:.2f} | "
                     f"{r['ratio']:.2f} | {r['identical_to_plain']} |")
    print("\n".join(lines))


def timing(args) -> None:
    """Round cost of each sampler: the same call (one batch of the set's prompts, a fixed seed) warm, interleaved.
    Greedy-free rows at T = 1; the rounds differ between samplers (their acceptance does), so compare ms per
    round as well as tokens per second."""
    target = dj.load_target(assets.TARGET, dtype="float32")
    draft = dj.load_draft(DRAFTS["dspark"], dtype="float32")
    tok = target.tokenizer
    texts = read_prompt_set(default_prompt_dir() / "gsm8k.jsonl")[: args.prompts]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                                  tokenize=False), add_special_tokens=False) for t in texts]
    common = dict(max_new_tokens=args.new_tokens, temperature=1.0, seed=0, schedule="fixed")
    arms = {s: (lambda s=s: dj.generate(target, draft, prompts, sampler=s, **common)) for s in ("coupled", "rejection")}
    arms["plain_coupled"] = lambda: dj.generate(target, None, prompts, sampler="coupled", **common)
    arms["plain_rejection"] = lambda: dj.generate(target, None, prompts, sampler="rejection", **common)
    timings = bench.interleave(arms, args.repetitions, log=log)
    rows = []
    for name, t in timings.items():
        stats = t.result.stats
        rounds = max(stats.rounds)  # the batch's loop runs until its longest row is done
        best = min(t.times_s)
        rows.append({"arm": name, "best_s": best, "median_s": sorted(t.times_s)[len(t.times_s) // 2],
                     "loop_rounds": rounds, "ms_per_loop_round": 1000 * best / rounds,
                     "tokens": sum(stats.num_generated), "tokens_per_s": sum(stats.num_generated) / best,
                     "tau": stats.mean_acceptance_length})
        log(json.dumps(rounded(rows[-1])))
    meta = {"machine": bench.machine(), "prompts": len(prompts), "new_tokens": args.new_tokens, "temperature": 1.0,
            "draft": "dspark", "set": "gsm8k", "repetitions": args.repetitions}
    Path(args.out + "_timing.json").write_text(json.dumps({"meta": meta, "rows": [rounded(r) for r in rows]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
