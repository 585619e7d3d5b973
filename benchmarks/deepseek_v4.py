"""DeepSeek-V4-Flash with its MTP module: the ahead-of-time compile of one speculative round at full size on a
forced 8-device CPU mesh (docs/deepseek.md §5-§10; the V3 counterpart is `benchmarks/deepseek.py --part aot`).

The V4-Flash config (43 layers: two sliding-only, then CSA / HCA alternating; 256 routed experts of 2048, top-6,
hash routing in the first three layers; 64 heads of 512 sharing one key/value head; hc_mult 4) and its MTP module
as abstract parameters (`nnx.eval_shape`, no weights) placed by the library's sharding rules on a
`(data=1, model=8)` mesh; one speculative round (`engine.spec.spec_step`, chained MTP-K, batch 8, a 4096-position
cache) lowered and compiled on `ShapeDtypeStruct`s. Reported: per-device bytes of parameters and state from their
shardings, the cache numbers per token, and XLA's memory analysis of the compiled program.

    python benchmarks/deepseek_v4.py                 # bf16, K = 3 (a few minutes on 2 shared cores)
    python benchmarks/deepseek_v4.py --dtypes bfloat16,float32 --ks 1,3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

WORKER = "--worker" in sys.argv
if WORKER:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

import dspark_jax as dj  # noqa: E402
from dspark_jax import sharding  # noqa: E402
from dspark_jax.config import RopeConfig  # noqa: E402
from dspark_jax.engine import generation, spec  # noqa: E402
from dspark_jax.layers import kv_cache as kv  # noqa: E402
from dspark_jax.layers.params import Init  # noqa: E402
from dspark_jax.models.deepseek_v4 import DeepseekV4Config, DeepseekV4Model  # noqa: E402
from dspark_jax.models.deepseek_v4.config import CSA, HASH, HCA, ROUTED, SLIDING  # noqa: E402
from dspark_jax.proposers.mtp_v4 import V4MTPConfig, V4MTPProposer  # noqa: E402

RESULTS = Path(__file__).parent / "results"
RATIOS = [0, 0] + [4, 128] * 20 + [4]  # Flash's compress_ratios (without the MTP layer's entry)
V4_FLASH = DeepseekV4Config(
    model_type="deepseek_v4", vocab_size=129280, hidden_size=4096, num_layers=43, num_heads=64, head_dim=512,
    q_lora_rank=1024, o_groups=8, o_lora_rank=1024, moe_intermediate_size=2048, n_routed_experts=256,
    num_experts_per_tok=6, layer_types=tuple({0: SLIDING, 4: CSA, 128: HCA}[r] for r in RATIOS),
    mlp_layer_types=tuple([HASH] * 3 + [ROUTED] * 40), csa_ratio=4, hca_ratio=128, rope_head_dim=64,
    sliding_window=128, index_n_heads=64, index_head_dim=128, index_topk=512, routed_scaling_factor=1.5,
    swiglu_limit=10.0, rope_main=RopeConfig(theta=10000.0),
    rope_compress=RopeConfig(theta=160000.0, rope_type="yarn", factor=16.0, original_max_position_embeddings=65536,
                             beta_fast=32, beta_slow=1, attention_factor=1.0),
    max_position_embeddings=1048576, num_mtp_layers=1,
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def abstract_sharded(make, mesh):
    """Graph definition and parameters of `make()` as sharded `ShapeDtypeStruct`s (no allocation)."""
    graphdef, state = nnx.split(nnx.eval_shape(make))

    def place(var):
        value = var.get_value()
        spec_ = sharding.partition_spec(value.shape, var.get_metadata().get("axes"), mesh)
        return var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=NamedSharding(mesh, spec_)))

    return graphdef, jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def per_device_bytes(tree) -> int:
    return sum(int(np.prod(x.sharding.shard_shape(x.shape), dtype=np.int64)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def total_bytes(tree) -> int:
    return sum(int(np.prod(x.shape, dtype=np.int64)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def aot_one(dtype, K, batch, cache_len, mesh) -> dict:
    dt = jnp.dtype(dtype)
    cfg = V4_FLASH
    tg, tp = abstract_sharded(lambda: DeepseekV4Model(cfg, Init(nnx.Rngs(0), dt)), mesh)
    pg, pp = abstract_sharded(lambda: V4MTPProposer(V4MTPConfig(target=cfg, max_draft_length=K), Init(nnx.Rngs(0), dt)), mesh)
    target = dj.Target(config=cfg, graphdef=tg, params=tp, dtype=dt)
    prompt = 64
    req, _, shapes = generation.build_requests(
        target, [[1] * prompt] * batch, max_new_tokens=cache_len - prompt - K - 2, temperature=0.0, top_k=0, top_p=1.0,
        seed=0, stop_token_ids=[], confidence_threshold=0.0,
    )
    capacity = shapes["capacity"]
    extra = {"chunk": shapes["chunk"]} if "chunk" in shapes else {}
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        state = jax.eval_shape(
            lambda a, b, r: spec.start(nnx.merge(tg, a), nnx.merge(pg, b), r, K=K, capacity=capacity,
                                       out_len=shapes["out_len"], **extra),
            tp, pp, req,
        )

        def place(x):
            axes = kv.CACHE_AXES if x.ndim == 5 else (("batch",) + (None,) * (x.ndim - 1) if x.ndim else ())
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, sharding.partition_spec(x.shape, axes, mesh)))

        state = jax.tree.map(place, state)
        lowered = spec.spec_step.lower(tg, tp, pg, pp, state, K=K, capacity=capacity)
        lower_s = time.perf_counter() - t0
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0 - lower_s
    m = compiled.memory_analysis()
    gib = 2.0**30
    caches = state.target_cache
    per_token = 0
    for group in caches:
        for c in group:
            for name in ("window", "raw", "entries", "index_entries"):
                x = getattr(c, name)
                if x is not None:  # numbers per token of history: rings hold S slots whatever the length
                    per_token += x.shape[0] * x.shape[-1] * (x.shape[2] / capacity)
    return {
        "dtype": str(dt), "K": K, "batch": batch, "capacity": capacity, "mesh": dict(mesh.shape),
        "target_params": sum(x.size for x in jax.tree.leaves(tp)), "mtp_params": sum(x.size for x in jax.tree.leaves(pp)),
        "lower_s": lower_s, "compile_s": compile_s,
        "params_per_device_gib": (per_device_bytes(tp) + per_device_bytes(pp)) / gib,
        "params_total_gib": (total_bytes(tp) + total_bytes(pp)) / gib,
        "target_cache_total_gib": total_bytes(caches) / gib,
        "target_cache_per_device_gib": per_device_bytes(caches) / gib,
        "cache_numbers_per_position_at_capacity": per_token,
        "mtp_state_per_device_gib": per_device_bytes(state.proposer_state) / gib,
        "state_per_device_gib": per_device_bytes(state) / gib,
        "xla_argument_gib": m.argument_size_in_bytes / gib,
        "xla_output_gib": m.output_size_in_bytes / gib,
        "xla_alias_gib": m.alias_size_in_bytes / gib,
        "xla_temp_gib": m.temp_size_in_bytes / gib,
    }


def worker(args) -> int:
    mesh = sharding.make_mesh(data=1, model=8)
    log(f"devices: {len(jax.devices())} ({jax.devices()[0].platform}), mesh {dict(mesh.shape)}")
    out = []
    for dtype in args.dtypes.split(","):
        for K in (int(k) for k in args.ks.split(",")):
            r = aot_one(dtype, K, args.batch, args.cache, mesh)
            log(f"  {dtype} K={K}: lower {r['lower_s']:.1f}s compile {r['compile_s']:.1f}s, params/device "
                f"{r['params_per_device_gib']:.1f} GiB, XLA arguments {r['xla_argument_gib']:.1f} GiB, temp {r['xla_temp_gib']:.1f} GiB")
            out.append(r)
    print("DEEPSEEK_V4_AOT " + json.dumps(out), flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dtypes", default="bfloat16")
    p.add_argument("--ks", default="3")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cache", type=int, default=4096)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    cmd = [sys.executable, __file__, "--worker", "--dtypes", args.dtypes, "--ks", args.ks, "--batch", str(args.batch),
           "--cache", str(args.cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    sys.stderr.write(proc.stderr[-4000:])
    rows = None
    for line in proc.stdout.splitlines():
        if line.startswith("DEEPSEEK_V4_AOT "):
            rows = json.loads(line[len("DEEPSEEK_V4_AOT "):])
    if rows is None:
        raise SystemExit(f"AOT worker failed (exit {proc.returncode})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "deepseek_v4_aot.json").write_text(json.dumps({"config": repr(V4_FLASH), "aot": rows}, indent=2))
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
