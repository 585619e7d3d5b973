"""DeepSeek-V4 with its MTP module (docs/deepseek.md §5-§11; the V3 counterpart is `benchmarks/deepseek.py`).

**Speed** (`--part speed`): a ~200M-parameter V4-shaped random model (16 layers: two sliding-only, then CSA / HCA
alternating; 16 routed experts of 384, top-4, hash routing in the first three layers; 8 heads of 128 sharing one
key/value head; hc_mult 4; fp32). Arms at temperature 0, measured exactly as in `benchmarks/deepseek.py` (its
`loop_arm`: long minus short runs of one compiled loop per arm): `ar` / `mtp1_oracle` / `mtp3_oracle` on
`testing.mtp_v4.bigram_target` with `testing.mtp_v4.oracle_mtp` (tau = K + 1), and `ar_random` / `mtp1_random` /
`mtp3_random` with `testing.mtp_v4.random_mtp` (tau ~ 1). `--drafts dspark` runs the V4 DSpark draft instead
(docs/deepseek.md §12: three sliding-only blocks over the inputs of the target's last three layers, block 5):
`dspark5_oracle` (`testing.dspark_v4.oracle_dspark`, tau = 6) and `dspark5_random` (`random_dspark`), written to
`deepseek_v4_dspark_speed.json`. `rho` = round time / AR step time; `rho_ideal` = (one
target pass over K + 1 tokens capturing the last-layer streams, plus the K chained MTP steps) / AR step time, each
jitted and timed alone; engine efficiency = rho_ideal / rho; compile time of each loop.

**AOT** (`--part aot`): the ahead-of-time compile of one speculative round at full size on a forced 8-device
CPU mesh.

The V4-Flash config (43 layers: two sliding-only, then CSA / HCA alternating; 256 routed experts of 2048, top-6,
hash routing in the first three layers; 64 heads of 512 sharing one key/value head; hc_mult 4) and its MTP module
as abstract parameters (`nnx.eval_shape`, no weights) placed by the library's sharding rules on a
`(data=1, model=8)` mesh; one speculative round (`engine.spec.spec_step`, chained MTP-K, batch 8, a 4096-position
cache) lowered and compiled on `ShapeDtypeStruct`s. Reported: per-device bytes of parameters and state from their
shardings, the cache numbers per token, and XLA's memory analysis of the compiled program.

    python benchmarks/deepseek_v4.py --part aot      # bf16, K = 3 (a few minutes on 2 shared cores)
    python benchmarks/deepseek_v4.py --part aot --dtypes bfloat16,float32 --ks 1,3
    python benchmarks/deepseek_v4.py --part speed --batch-sizes 1 --repetitions 2
    python benchmarks/deepseek_v4.py --part speed --drafts dspark --batch-sizes 1 --repetitions 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
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
from dspark_jax.proposers.dspark_v4 import V4DSparkDraft  # noqa: E402
from dspark_jax.proposers.mtp_v4 import V4MTPConfig, V4MTPProposer  # noqa: E402
from dspark_jax.testing import dspark_v4 as synthetic_dspark  # noqa: E402
from dspark_jax.testing import mtp_v4 as synthetic_mtp  # noqa: E402
from dspark_jax.testing import synthetic  # noqa: E402
from dspark_jax.tools import bench  # noqa: E402

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


SMALL_RATIOS = [0, 0] + [4, 128] * 7
SMALL = DeepseekV4Config(
    model_type="deepseek_v4", vocab_size=32000, hidden_size=512, num_layers=16, num_heads=8, head_dim=128,
    q_lora_rank=192, o_groups=4, o_lora_rank=128, moe_intermediate_size=384, n_routed_experts=16,
    num_experts_per_tok=4, layer_types=tuple({0: SLIDING, 4: CSA, 128: HCA}[r] for r in SMALL_RATIOS),
    mlp_layer_types=tuple([HASH] * 3 + [ROUTED] * 13), rope_head_dim=16, sliding_window=128, index_n_heads=8,
    index_head_dim=32, index_topk=32, rope_compress=V4_FLASH.rope_compress, max_position_embeddings=65536,
    num_mtp_layers=1,
)
KS = (1, 3)
BUDGETS = {"ar": (33, 1), "ar_random": (33, 1), "mtp1_oracle": (49, 1), "mtp3_oracle": (97, 1),
           "mtp1_random": (17, 1), "mtp3_random": (17, 1), "dspark5_oracle": (145, 1), "dspark5_random": (17, 1)}
DSPARK_BLOCK = 5  # DeepSeek-V4-Flash-DSpark's dspark_block_size (target_families.md §2)


def _v3_bench():
    """`benchmarks/deepseek.py`, for its family-independent loop timing (`loop_arm`, `per_repetition`, `repeated`)."""
    spec_ = importlib.util.spec_from_file_location("deepseek_v3_bench", Path(__file__).parent / "deepseek.py")
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    return module


def piece_arms(target, draft, B, prompt_len, K, seed, v3):
    """Zero-argument callables timing the pieces of one round at a committed length of prompt + 64."""
    rng = np.random.default_rng(seed)
    c = target.config
    capacity = prompt_len + v3.CAPACITY_NEW + K + 1
    lengths = jnp.full((B,), prompt_len + 64, jnp.int32)
    caches = {"target": target.module.init_cache(B, capacity, max_block=K + 1), "mtp": draft.module.init_state(B, capacity)}
    verify_ids = jnp.asarray(rng.integers(0, c.vocab_size, (B, K + 1)), jnp.int32)
    width = (len(draft.module.feature_indices) if isinstance(draft.module, V4DSparkDraft) else c.hc_mult) * c.hidden_size
    features = jnp.asarray(rng.standard_normal((B, K + 1, width)), target.dtype)
    req, _, _ = generation.build_requests(target, verify_ids.tolist(), max_new_tokens=8, temperature=0.0, top_k=0,
                                          top_p=1.0, seed=0, stop_token_ids=[], confidence_threshold=0.0)
    capture = draft.module.feature_indices

    def run_target(ids):
        logits, caches["target"], feats = v3.target_pass(target.graphdef, target.params, ids, lengths, caches["target"],
                                                         capture=capture)
        return logits, feats

    def run_extend():
        caches["mtp"] = v3.extend_pass(draft.graphdef, draft.params, caches["mtp"], verify_ids, features, lengths)
        return caches["mtp"]

    return {
        "target_1": lambda: run_target(verify_ids[:, :1])[0],
        "target_verify": lambda: run_target(verify_ids),
        "propose": lambda: v3.propose_pass(draft.graphdef, draft.params, caches["mtp"], verify_ids[:, 0], lengths,
                                           req.sampling, req.keys, K=K),
        "extend": run_extend,
    }


def speed(args) -> dict:
    v3 = _v3_bench()
    med = statistics.median
    reps = range(args.repetitions)
    successor = synthetic.random_permutation_successor(SMALL.vocab_size, args.seed)
    bigram = synthetic_mtp.bigram_target(SMALL, successor, seed=args.seed)
    random_target = dj.Target.random(SMALL, seed=args.seed + 1)
    if args.drafts == "dspark":
        prefix, ks = "dspark", (DSPARK_BLOCK,)
        drafts = {"oracle": synthetic_dspark.oracle_dspark(bigram, successor, seed=args.seed, block_size=DSPARK_BLOCK),
                  "random": synthetic_dspark.random_dspark(random_target, seed=args.seed + 1, block_size=DSPARK_BLOCK,
                                                            markov_rank=SMALL.hidden_size)}  # the oracle's shapes
    else:
        prefix, ks = "mtp", KS
        drafts = {"oracle": synthetic_mtp.oracle_mtp(bigram, successor, seed=args.seed, max_draft_length=max(KS)),
                  "random": synthetic_mtp.random_mtp(random_target, seed=args.seed + 1, max_draft_length=max(KS))}
    targets = {"oracle": bigram, "random": random_target}
    log(f"target {bigram.num_params / 1e6:.1f}M params, {prefix} draft {drafts['oracle'].num_params / 1e6:.1f}M params")
    rows = []
    for B in args.batch_sizes:
        prompts = np.random.default_rng(args.seed + B).integers(0, SMALL.vocab_size, (B, args.prompt_len)).tolist()
        arms, compile_s = {}, {}
        for kind in ("oracle", "random"):
            ar_name = "ar" if kind == "oracle" else "ar_random"
            pairs = {ar_name: (None, None)} | {f"{prefix}{K}_{kind}": (drafts[kind], K) for K in ks}
            for name, (draft, K) in pairs.items():
                n_long, n_short = BUDGETS[name]
                arms[f"{name}_long"] = v3.loop_arm(targets[kind], draft, prompts, n_long, K, False)
                arms[f"{name}_short"] = v3.loop_arm(targets[kind], draft, prompts, n_short, K, False)
                if kind == "oracle":  # the random arms run the very same programs (same shapes): compiled once
                    other = name.replace("oracle", "random") if name != "ar" else "ar_random"
                    compile_s[name] = compile_s[other] = arms[f"{name}_long"].compile_seconds()
                    log(f"  compiled {name} B={B}: {compile_s[name]:.1f}s")
        pieces = {}
        for kind in ("oracle", "random"):
            for K in ks:
                for n, fn in piece_arms(targets[kind], drafts[kind], B, args.prompt_len, K, args.seed, v3).items():
                    pieces[f"piece_{n}_{K}_{kind}"] = v3.repeated(fn, args.piece_calls)
        log(f"batch {B}: loops and pieces, {args.repetitions} interleaved repetitions")
        t = bench.interleave(arms | pieces, args.repetitions, log=log)
        for kind in ("oracle", "random"):
            ar_name = "ar" if kind == "oracle" else "ar_random"
            ar_step, ar_tok_s = v3.per_repetition(t, ar_name, B)
            for K in ks:
                name = f"{prefix}{K}_{kind}"
                round_s, spec_tok_s = v3.per_repetition(t, name, B)
                res = t[f"{name}_long"].result
                pc = {n: [x / args.piece_calls for x in t[f"piece_{n}_{K}_{kind}"].times_s]
                      for n in ("target_1", "target_verify", "propose", "extend")}
                ideal = [pc["target_verify"][i] + pc["propose"][i] for i in reps]
                rho = [round_s[i] / ar_step[i] for i in reps]
                rho_ideal = [ideal[i] / ar_step[i] for i in reps]
                row = {
                    "arm": name, "batch": B, "K": K, "tau": int(res["accepted_tokens"]) / int(res["rounds"]),
                    "ar_step_ms": 1e3 * med(ar_step), "spec_round_ms": 1e3 * med(round_s),
                    "ar_tok_s": med(ar_tok_s), "spec_tok_s": med(spec_tok_s),
                    "speedup": med([spec_tok_s[i] / ar_tok_s[i] for i in reps]),
                    "rho": med(rho), "rho_ideal": med(rho_ideal),
                    "engine_efficiency": med([rho_ideal[i] / rho[i] for i in reps]),
                    "ar_compile_s": compile_s[ar_name], "spec_compile_s": compile_s[name],
                    "pieces_ms": {n: 1e3 * med(v) for n, v in pc.items()},
                    "per_repetition": {"ar_step_s": ar_step, "round_s": round_s, "pieces_s": pc},
                }
                rows.append(row)
                log(f"  {name} B={B}: tau {row['tau']:.2f} rho {row['rho']:.3f} rho_ideal {row['rho_ideal']:.3f} "
                    f"efficiency {row['engine_efficiency']:.3f} speedup {row['speedup']:.2f}")
    return {"rows": rows, "target_params": bigram.num_params, f"{prefix}_params": drafts["oracle"].num_params,
            "config": repr(SMALL)}


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
                    per_token += x.shape[0] * x.shape[-1] * (x.shape[3] / capacity)
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
    p.add_argument("--part", default="aot", choices=["all", "speed", "aot"])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch-sizes", default="1")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--piece-calls", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drafts", default="mtp", choices=["mtp", "dspark"], help="the speed part's draft family")
    p.add_argument("--dtypes", default="bfloat16")
    p.add_argument("--ks", default="3")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cache", type=int, default=4096)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",")]
    if args.worker:
        return worker(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part in ("speed", "all"):
        result = speed(args)
        name = "deepseek_v4_speed.json" if args.drafts == "mtp" else "deepseek_v4_dspark_speed.json"
        (out / name).write_text(json.dumps(result, indent=2))
        print(json.dumps([{k: r[k] for k in ("arm", "batch", "tau", "ar_step_ms", "spec_round_ms", "speedup", "rho",
                                             "rho_ideal", "engine_efficiency", "ar_compile_s", "spec_compile_s")}
                          for r in result["rows"]], indent=2))
    if args.part == "speed":
        return 0
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
    (out / "deepseek_v4_aot.json").write_text(json.dumps({"config": repr(V4_FLASH), "aot": rows}, indent=2))
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
