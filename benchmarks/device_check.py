"""Accelerator check: AR decode speed and its fraction of the memory roofline, the speculative round's engine
efficiency, and compile times, for random Qwen3 models, in one short script.

* `--size full` (default on GPU/TPU): ~1.7B-shaped (hidden 2048, 28 layers) and ~8B-shaped (hidden 4096, 36 layers)
  Qwen3 with the real vocabulary (151,936), bf16; `--size small` (default on CPU): the same code at toy width.
* AR: `dj.generate(target, None, ...)` of B in `--batch-sizes` prompts; step time = (t_long - t_short) / (n_long -
  n_short) (prefill cancels), tok/s = B / step. Roofline fraction = (non-embedding weight bytes + KV bytes read per
  step) / step time / bandwidth; bandwidth is the datasheet HBM figure on GPU/TPU (`--bandwidth-gbs`, H200 4800) and
  a streaming probe measured in the same run on CPU.
* Speculative, batch 1, K = 7, random 1-layer DSpark draft (tau ~ 1): rho = round time / AR step; rho_ideal =
  (one jitted target pass over K + 1 tokens with feature capture + one jitted draft proposal) / AR step; engine
  efficiency = rho_ideal / rho.
* Compile: first call minus a steady call of the same program (scanned layers, and `unroll_layers=True`).

    python benchmarks/device_check.py                         # writes results/device_check_<backend>.{json,md}
    python benchmarks/device_check.py --size small            # < 3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import dspark_jax as dj
from dspark_jax.config import SamplingParams
from dspark_jax.engine import sampling
from dspark_jax.testing import synthetic
from dspark_jax.tools import bench

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {
    "full": {
        "1.7B": dict(hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                     vocab_size=151936),
        "8B": dict(hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                   vocab_size=151936),
    },
    "small": {
        "toy-A": dict(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                      vocab_size=4096),
        "toy-B": dict(hidden_size=256, intermediate_size=768, num_layers=6, num_heads=4, num_kv_heads=2, head_dim=64,
                      vocab_size=8192),
    },
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn, repetitions: int = 3) -> tuple[float, float]:
    """(first call s, median of `repetitions` later calls s)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repetitions):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def paired(long_fn, short_fn, repetitions: int = 5) -> tuple[float, float]:
    """(first call of `long_fn` minus its steady time, median over repetitions of t_long - t_short), the two arms
    interleaved so load drift hits both alike."""
    t0 = time.perf_counter()
    long_fn()
    first = time.perf_counter() - t0
    short_fn()
    diffs, longs = [], []
    for _ in range(repetitions):
        t0 = time.perf_counter()
        long_fn()
        t1 = time.perf_counter()
        short_fn()
        t2 = time.perf_counter()
        diffs.append((t1 - t0) - (t2 - t1))
        longs.append(t1 - t0)
    return max(0.0, first - statistics.median(longs)), statistics.median(diffs)


def ar_step(target, B: int, prompt_len: int, new: tuple[int, int], **kwargs) -> dict:
    rng = np.random.default_rng(B)
    prompts = [rng.integers(0, target.config.vocab_size, prompt_len).tolist() for _ in range(B)]
    run = lambda n: lambda: dj.generate(target, None, prompts, max_new_tokens=n, stop_token_ids=[], **kwargs)
    compile_s, diff = paired(run(new[0]), run(new[1]))
    return {"step_s": diff / (new[0] - new[1]), "compile_s": compile_s}


def spec_round(target, draft, prompt_len: int, new: tuple[int, int], K: int) -> dict:
    prompt = [np.random.default_rng(0).integers(0, target.config.vocab_size, prompt_len).tolist()]
    run = lambda n: lambda: dj.generate(target, draft, prompt, max_new_tokens=n, stop_token_ids=[], draft_length=K)
    compile_s, diff = paired(run(new[0]), run(new[1]))
    rounds = {n: run(n)().stats.rounds[0] for n in new}
    round_s = diff / max(1, rounds[new[0]] - rounds[new[1]])
    # the necessary work of a round, each piece jitted and timed alone
    t_mod, d_mod = target.module, draft.module
    capacity = prompt_len + new[0] + K + 16
    lengths = jnp.asarray([prompt_len], jnp.int32)
    verify_ids = jnp.zeros((1, K + 1), jnp.int32)
    cache = t_mod.init_cache(1, capacity, max_block=K + 1)
    state = d_mod.init_state(1, capacity)
    params = SamplingParams.create(1)
    keys = sampling.row_keys(jnp.zeros(1, jnp.uint32), jnp.zeros(1, jnp.uint32))

    @functools.partial(jax.jit)
    def verify(cache):
        hidden, _, features = t_mod(verify_ids, lengths, cache, capture=d_mod.feature_indices)
        return t_mod.logits(hidden), features

    @functools.partial(jax.jit)
    def propose(state):
        return d_mod.propose(state, verify_ids[:, 0], lengths, params, keys, K)

    _, verify_s = timed(lambda: jax.block_until_ready(verify(cache)), 5)
    _, propose_s = timed(lambda: jax.block_until_ready(propose(state)), 5)
    return {"round_s": round_s, "verify_s": verify_s, "propose_s": propose_s, "compile_s": compile_s}


def main(argv=None) -> int:
    backend = jax.default_backend()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("full", "small"), default="small" if backend == "cpu" else "full")
    p.add_argument("--batch-sizes", default="1,8,64")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on accelerators, float32 on CPU")
    p.add_argument("--bandwidth-gbs", type=float, default=4800.0, help="datasheet HBM bandwidth on GPU/TPU (H200: 4800)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    new = (128, 65)  # one power-of-two bucket: the same compiled program, prefill cancels
    machine = bench.machine()
    if backend == "cpu":
        bw = bench.memory_bandwidth(nbytes=1 << 28, repetitions=3)["best_gbs"]
        bw_note = f"measured streaming probe, {bw:.1f} GB/s"
    else:
        bw, bw_note = args.bandwidth_gbs, f"datasheet {args.bandwidth_gbs:.0f} GB/s"
    log(f"{backend}: {machine['devices']}; bandwidth {bw_note}")
    ar_rows, spec_rows = [], []
    for name, shape in SHAPES[args.size].items():
        cfg = dj.Qwen3Config(model_type="qwen3", max_position_embeddings=4096, **shape)
        target = dj.Target.random(cfg, dtype=dtype, seed=0)
        itemsize = jnp.dtype(dtype).itemsize
        weight_bytes = target.param_bytes - cfg.vocab_size * cfg.hidden_size * itemsize  # a step gathers B embedding rows
        for B in batches:
            r = ar_step(target, B, args.prompt_len, new)
            kv_bytes = 2 * cfg.num_layers * B * (args.prompt_len + sum(new) // 2) * cfg.num_kv_heads * cfg.head_dim * itemsize
            frac = (weight_bytes + kv_bytes) / r["step_s"] / (bw * 1e9)
            ar_rows.append([name, target.num_params / 1e9, B, B / r["step_s"], r["step_s"] * 1e3, frac, r["compile_s"]])
            log(f"{name} B={B}: {ar_rows[-1]}")
        u = ar_step(target, 1, args.prompt_len, new, unroll_layers=True)
        ar_rows.append([f"{name} unrolled", target.num_params / 1e9, 1, 1 / u["step_s"], u["step_s"] * 1e3,
                        (weight_bytes) / u["step_s"] / (bw * 1e9), u["compile_s"]])
        draft = synthetic.random_draft(target, synthetic.draft_config_for(cfg, num_layers=1, markov_rank=64), seed=1)
        K = 7
        s = spec_round(target, draft, args.prompt_len, new, K)
        ar1 = next(row for row in ar_rows if row[0] == name and row[2] == 1)[4] / 1e3
        rho, rho_ideal = s["round_s"] / ar1, (s["verify_s"] + s["propose_s"]) / ar1
        spec_rows.append([name, K, rho, rho_ideal, rho_ideal / rho, s["compile_s"]])
        log(f"{name} spec: {spec_rows[-1]}")
        del target, draft
    tables = [
        bench.Table(f"AR decode ({dtype}; bandwidth: {bw_note})",
                    ["model", "params B", "batch", "tok/s", "step ms", "roofline fraction", "compile s"], ar_rows),
        bench.Table("Speculative round, batch 1, random draft (engine efficiency = rho_ideal / rho)",
                    ["model", "K", "rho", "rho_ideal", "engine efficiency", "compile s"], spec_rows),
    ]
    bench.write_report(args.out, f"device_check_{backend}", title=f"Device check ({backend})", tables=tables,
                       meta={"machine": machine, "settings": vars(args) | {"dtype": dtype, "bandwidth_gbs": bw}})
    for t in tables:
        print(t.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
