"""Cost of drawing one token per row at V = 151,936 (Qwen3's vocabulary): the exact two-level sampler
(`sampling.sample`, docs/algorithm.md §3.5) against the one-uniform CDF sampler it replaced, batch 1 and 64.

Arms, interleaved A B C A B C ... (benchmarks/README.md), each a jitted function of `(keys, probs [B, V])`:

* `old`: the replaced sampler, copied here: `cumsum` over the row, one `jax.random.uniform`, count of CDF
  entries below it (not exact: ~2e-3 TV and tens of thousands of unreachable tokens at this V,
  `tests/test_sampler_exact.py`);
* `exact`: `sampling.sample` (pairwise block masses, two 9-level sum-tree walks, 18 full-precision uniforms);
* `softmax`: `jax.nn.softmax` of the same row, the step before any sampler, as the scale the sampler's cost is
  read against.

Each timed call runs the arm `--inner` times on fresh keys (the last result is waited for); the tables quote
milliseconds per draw (one draw = one token for every row), median over repetitions. Rows are softmaxes of
N(0, 3^2) logits, the same for every arm.

    python benchmarks/sampler.py                      # writes results/sampler.{json,md}
    python benchmarks/sampler.py --repetitions 3 --out /tmp/sampler_smoke
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from dspark_jax.engine import sampling
from dspark_jax.tools import bench

RESULTS = Path(__file__).parent / "results"
V = 151_936


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def old_sample(keys, probs):
    """The sampler `sampling.sample` replaced (one float32 uniform against a float32 CDF of the whole row)."""
    cdf = jnp.cumsum(probs, axis=-1)
    u = jax.vmap(lambda k: jax.random.uniform(k))(keys) * cdf[:, -1]
    return jnp.minimum(jnp.sum(cdf <= u[:, None], axis=-1), probs.shape[-1] - 1).astype(jnp.int32)


def softmax_only(keys, probs):
    del keys
    return jax.nn.softmax(probs, axis=-1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--repetitions", type=int, default=15)
    p.add_argument("--inner", type=int, default=0, help="draws per timed call (default: 50 at batch 1, 3 at batch 64)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    machine = bench.machine()
    log(f"{machine['cpu_model']} x{machine['cpu_cores']}, backend {machine['jax_backend']}, load {machine['load_average']}")

    functions = {"old": jax.jit(old_sample), "exact": jax.jit(sampling.sample), "softmax": jax.jit(softmax_only)}
    rows, data = [], {}
    for B in (int(b) for b in args.batch_sizes.split(",")):
        inner = args.inner or (50 if B == 1 else 3)
        logits = 3.0 * jax.random.normal(jax.random.key(0), (B, V), jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)
        base = sampling.row_keys(jnp.zeros(B, jnp.uint32), jnp.arange(B, dtype=jnp.uint32))
        keys = [sampling.step_keys(base, sampling.SALT_TOKEN, jnp.full(B, i, jnp.int32)) for i in range(inner)]

        def arm(fn, x, keys=keys):
            def run():
                out = None
                for k in keys:
                    out = fn(k, x)
                return out
            return run

        arms = {name: arm(fn, logits if name == "softmax" else probs) for name, fn in functions.items()}
        log(f"batch {B}: {inner} draws per call")
        timings = bench.interleave(arms, args.repetitions, log=log)
        ms = {name: t.median_s / inner * 1e3 for name, t in timings.items()}
        rows.append([B, ms["old"], ms["exact"], ms["exact"] / ms["old"], ms["softmax"], ms["exact"] / ms["softmax"]])
        data[f"batch_{B}"] = {"inner": inner} | {name: t.summary() for name, t in timings.items()}
    table = bench.Table(
        f"Sampler cost at V = {V:,} (ms per draw, median of {args.repetitions} interleaved repetitions)",
        ["batch", "old ms", "exact ms", "exact / old", "softmax ms", "exact / softmax"],
        rows,
        note="old = one float32 uniform against the float32 CDF of the whole row (replaced); exact = "
             "`sampling.sample`; softmax = the softmax of the row's logits, for scale.",
    )
    meta = {"machine": machine, "settings": vars(args) | {"V": V, "logits": "N(0, 3^2)", "dtype": "float32"},
            "load_average_end": list(os.getloadavg())}
    bench.write_report(args.out, "sampler", title="Exact sampler vs the one-uniform CDF sampler", tables=[table],
                       meta=meta, data=data)
    print(table.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
