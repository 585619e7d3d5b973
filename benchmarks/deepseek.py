"""DeepSeek-V3 with its MTP module: AR vs speculative decoding on a scaled-down model, and the ahead-of-time
compile of one speculative round at DeepSeek-V3-671B shapes on a forced 8-device CPU mesh (benchmarks.md).

**Speed** (`--part speed`): a ~200M-parameter V3-shaped random model (MLA with q/kv low rank, one dense layer
then MoE layers of 16 routed experts, group-limited top-4, one shared expert; fp32, the dtype XLA:CPU runs
fastest). Arms, each at the requested batch sizes, temperature 0:
* `ar` / `mtp1_oracle` / `mtp3_oracle`: `synthetic.bigram_target` (random weights whose greedy continuation
  follows a permutation) decoded plainly and with `testing.mtp.oracle_mtp` (a real MTP block run at full cost,
  drafting that permutation: tau = K + 1), MTP-1 (K = 1) and chained MTP-3 (K = 3);
* `ar_random` / `mtp1_random` / `mtp3_random`: a random target with `testing.mtp.random_mtp` (tau ~ 1, the
  worst-case overhead of speculating).
Every arm runs the library's compiled whole-generation loop with one cache capacity for all budgets, so long and
short runs of an arm execute one program: a step (or round) costs (t_long - t_short) / (iterations_long -
iterations_short), prefill cancels. `rho` = round time / AR step time (same target). `rho_ideal` = (one target
pass over K + 1 tokens capturing the final hidden state, with logits + the K chained MTP steps of `propose`),
each jitted and timed alone in the same interleaved repetitions, over the AR step time; engine efficiency =
rho_ideal / rho. The MTP context update (`extend`) is timed too. Compile time: lowering + compiling each loop
ahead of time.

**AOT** (`--part aot`, a fresh process with `--xla_force_host_platform_device_count=8`): the DeepSeek-V3-671B
config (61 layers, 256 experts, YaRN factor 40) and its MTP module as abstract parameters (`nnx.eval_shape`,
no weights) placed by the library's sharding rules on a `(data=1, model=8)` mesh; one speculative round
(`engine.spec.spec_step`, MTP-1 and chained MTP-3, batch 8, 4096-token cache) lowered and compiled on
`ShapeDtypeStruct`s; per-device bytes of parameters and state from their shardings, and XLA's memory analysis
of the compiled program. XLA:CPU has no bf16 dot: it upcasts bf16 operands to f32, hoisting whole stacked
weights out of the layer scan, so its bf16 temp size is not what a GPU/TPU allocates; the float32 compile gives
the activation temp without those copies.

    python benchmarks/deepseek.py                         # both parts (~15 min on 2 shared cores)
    python benchmarks/deepseek.py --part aot              # ~2 min
    python benchmarks/deepseek.py --part speed --batch-sizes 1 --repetitions 3
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if "--part" in sys.argv and sys.argv[sys.argv.index("--part") + 1] == "aot-worker":
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

import dspark_jax as dj  # noqa: E402
from dspark_jax import sharding  # noqa: E402
from dspark_jax.config import RopeConfig  # noqa: E402
from dspark_jax.engine import decode, generation, spec  # noqa: E402
from dspark_jax.layers import kv_cache as kv  # noqa: E402
from dspark_jax.layers.params import Init  # noqa: E402
from dspark_jax.models.deepseek_v3 import DeepseekV3Config  # noqa: E402
from dspark_jax.models.deepseek_v3.model import DeepseekV3Model  # noqa: E402
from dspark_jax.proposers.mtp import MTPConfig, MTPProposer  # noqa: E402
from dspark_jax.testing import mtp as synthetic_mtp  # noqa: E402
from dspark_jax.testing import synthetic  # noqa: E402
from dspark_jax.tools import bench  # noqa: E402

RESULTS = Path(__file__).parent / "results"
KS = (1, 3)
CAPACITY_NEW = 256
# (long, short) new-token budgets; the short run is prefill plus at most one step or round.
BUDGETS = {"ar": (33, 1), "ar_random": (33, 1), "mtp1_oracle": (49, 1), "mtp3_oracle": (97, 1),
           "mtp1_random": (17, 1), "mtp3_random": (17, 1)}

SMALL = DeepseekV3Config(
    model_type="deepseek_v3", vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=16, num_heads=8,
    kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, q_lora_rank=192, moe_intermediate_size=384,
    n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
    first_k_dense_replace=1, max_position_embeddings=4096, num_mtp_layers=1,
)
V3_671B = DeepseekV3Config(
    model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_layers=61, num_heads=128,
    kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, q_lora_rank=1536,
    moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
    routed_scaling_factor=2.5, first_k_dense_replace=3, max_position_embeddings=163840, num_mtp_layers=1,
    rope=RopeConfig(theta=10000.0, rope_type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32,
                    beta_slow=1, mscale=1.0, mscale_all_dim=1.0, max_position_embeddings=163840),
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def config_dict(cfg) -> dict:
    return cfg.__dict__ | {"rope": cfg.rope.__dict__}


# ------------------------------------------------------------------------------------------------ speed


def loop_arm(target, draft, prompts, n, K, unroll):
    """A call of the compiled whole-generation loop with a fixed capacity; -> its statistics."""
    req, _, shapes = generation.build_requests(
        target, prompts, max_new_tokens=n, temperature=0.0, top_k=0, top_p=1.0, seed=0, stop_token_ids=[],
        confidence_threshold=0.0,
    )
    T = req.tokens.shape[1]
    extra = K or 0
    shapes = dict(shapes, capacity=T + CAPACITY_NEW + extra + 1, out_len=CAPACITY_NEW + extra + 1, unroll_layers=unroll)

    def compile_s():
        if draft is None:
            return bench.compile_seconds(decode.generate_loop, target.graphdef, target.params, req, **shapes)
        return bench.compile_seconds(spec.generate_loop, target.graphdef, target.params, draft.graphdef, draft.params, req,
                                     K=K, **shapes)

    def call():
        if draft is None:
            out, count = decode.generate_loop(target.graphdef, target.params, req, **shapes)
            return {"count": count, "iterations": jnp.max(count) - 1}
        state = spec.generate_loop(target.graphdef, target.params, draft.graphdef, draft.params, req, K=K, **shapes)
        acc = jnp.where(jnp.arange(state.acceptance_lengths.shape[1])[None] < state.rounds[:, None], state.acceptance_lengths, 0)
        return {"count": state.count, "iterations": jnp.max(state.rounds), "accepted_tokens": jnp.sum(acc),
                "rounds": jnp.sum(state.rounds)}

    call.compile_seconds = compile_s
    return call


@functools.partial(jax.jit, static_argnames=("graphdef", "capture"), donate_argnames=("cache",))
def target_pass(graphdef, params, tokens, lengths, cache, *, capture):
    """Target forward over `tokens [B, T]` capturing `capture`, plus fp32 logits."""
    model = nnx.merge(graphdef, params)
    hidden, cache, features = model(tokens, lengths, cache, capture=capture)
    return model.logits(hidden), cache, features


@functools.partial(jax.jit, static_argnames=("graphdef", "K"))
def propose_pass(graphdef, params, state, anchor, lengths, sampling_params, keys, *, K):
    """The K chained MTP steps of a round (`propose`)."""
    return nnx.merge(graphdef, params).propose(state, anchor, lengths, sampling_params, keys, K).tokens


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("state",))
def extend_pass(graphdef, params, state, tokens, features, lengths):
    """The MTP context update of a round: K + 1 verified rows."""
    return nnx.merge(graphdef, params).extend(state, tokens, features, lengths)


def piece_arms(target, draft, B, prompt_len, K, seed):
    """Zero-argument callables timing the pieces of one round at a committed length of prompt + 64."""
    rng = np.random.default_rng(seed)
    V, L, D = target.config.vocab_size, target.config.num_layers, target.config.hidden_size
    capacity = prompt_len + CAPACITY_NEW + K + 1
    lengths = jnp.full((B,), prompt_len + 64, jnp.int32)
    caches = {"target": target.module.init_cache(B, capacity), "mtp": draft.module.init_state(B, capacity)}
    verify_ids = jnp.asarray(rng.integers(0, V, (B, K + 1)), jnp.int32)
    features = jnp.asarray(rng.standard_normal((B, K + 1, D)), target.dtype)
    req, _, _ = generation.build_requests(target, verify_ids.tolist(), max_new_tokens=8, temperature=0.0, top_k=0,
                                          top_p=1.0, seed=0, stop_token_ids=[], confidence_threshold=0.0)

    def run_target(ids):
        logits, caches["target"], feats = target_pass(target.graphdef, target.params, ids, lengths, caches["target"],
                                                      capture=(L,))
        return logits, feats

    def run_extend():
        caches["mtp"] = extend_pass(draft.graphdef, draft.params, caches["mtp"], verify_ids, features, lengths)
        return caches["mtp"]

    return {
        "target_1": lambda: run_target(verify_ids[:, :1])[0],
        "target_verify": lambda: run_target(verify_ids),
        "propose": lambda: propose_pass(draft.graphdef, draft.params, caches["mtp"], verify_ids[:, 0], lengths,
                                        req.sampling, req.keys, K=K),
        "extend": run_extend,
    }


def repeated(fn, calls: int):
    def call():
        out = None
        for _ in range(calls):
            out = jax.block_until_ready(fn())
        return out

    return call


def per_repetition(t, name, B):
    long, short = t[f"{name}_long"], t[f"{name}_short"]
    iterations = int(long.result["iterations"]) - int(short.result["iterations"])
    tokens = int(jnp.sum(long.result["count"][:B])) - int(jnp.sum(short.result["count"][:B]))
    dts = [a - b for a, b in zip(long.times_s, short.times_s, strict=True)]
    return [dt / iterations for dt in dts], [tokens / dt for dt in dts]


def speed(args) -> dict:
    med = statistics.median
    reps = range(args.repetitions)
    successor = synthetic.random_permutation_successor(SMALL.vocab_size, args.seed)
    bigram = synthetic.bigram_target(SMALL, successor=successor, seed=args.seed)
    random_target = dj.Target.random(SMALL, seed=args.seed + 1)
    drafts = {"oracle": synthetic_mtp.oracle_mtp(bigram, successor, seed=args.seed, max_draft_length=max(KS)),
              "random": synthetic_mtp.random_mtp(random_target, seed=args.seed + 1, max_draft_length=max(KS))}
    targets = {"oracle": bigram, "random": random_target}
    log(f"target {bigram.num_params / 1e6:.1f}M params, MTP {drafts['oracle'].num_params / 1e6:.1f}M params "
        f"(its embedding and head copies {2 * SMALL.vocab_size * SMALL.hidden_size / 1e6:.1f}M)")
    rows = []
    for B in args.batch_sizes:
        prompts = np.random.default_rng(args.seed + B).integers(0, SMALL.vocab_size, (B, args.prompt_len)).tolist()
        arms, compile_s = {}, {}
        for kind in ("oracle", "random"):
            ar_name = "ar" if kind == "oracle" else "ar_random"
            pairs = {ar_name: (None, None)} | {f"mtp{K}_{kind}": (drafts[kind], K) for K in KS}
            for name, (draft, K) in pairs.items():
                n_long, n_short = BUDGETS[name]
                arms[f"{name}_long"] = loop_arm(targets[kind], draft, prompts, n_long, K, args.unroll_layers)
                arms[f"{name}_short"] = loop_arm(targets[kind], draft, prompts, n_short, K, args.unroll_layers)
                if kind == "oracle":  # the random arms run the very same programs (same shapes): compiled once
                    compile_s[name] = compile_s[name.replace("oracle", "random") if name != "ar" else "ar_random"] = \
                        arms[f"{name}_long"].compile_seconds()
                    log(f"  compiled {name} B={B}: {compile_s[name]:.1f}s")
        pieces = {}
        for kind in ("oracle", "random"):
            for K in KS:
                for n, fn in piece_arms(targets[kind], drafts[kind], B, args.prompt_len, K, args.seed).items():
                    pieces[f"piece_{n}_{K}_{kind}"] = repeated(fn, args.piece_calls)
        log(f"batch {B}: loops and pieces, {args.repetitions} interleaved repetitions")
        t = bench.interleave(arms | pieces, args.repetitions, log=log)
        for kind in ("oracle", "random"):
            ar_name = "ar" if kind == "oracle" else "ar_random"
            ar_step, ar_tok_s = per_repetition(t, ar_name, B)
            for K in KS:
                name = f"mtp{K}_{kind}"
                round_s, spec_tok_s = per_repetition(t, name, B)
                res = t[f"{name}_long"].result
                pc = {n: [x / args.piece_calls for x in t[f"piece_{n}_{K}_{kind}"].times_s]
                      for n in ("target_1", "target_verify", "propose", "extend")}
                ideal = [pc["target_verify"][i] + pc["propose"][i] for i in reps]
                full = [ideal[i] + pc["extend"][i] for i in reps]
                rho = [round_s[i] / ar_step[i] for i in reps]
                rho_ideal = [ideal[i] / ar_step[i] for i in reps]
                row = {
                    "arm": name, "batch": B, "K": K, "tau": int(res["accepted_tokens"]) / int(res["rounds"]),
                    "ar_step_ms": 1e3 * med(ar_step), "spec_round_ms": 1e3 * med(round_s),
                    "ar_tok_s": med(ar_tok_s), "spec_tok_s": med(spec_tok_s),
                    "speedup": med([spec_tok_s[i] / ar_tok_s[i] for i in reps]),
                    "rho": med(rho), "rho_ideal": med(rho_ideal),
                    "engine_efficiency": med([rho_ideal[i] / rho[i] for i in reps]),
                    "rho_pieces": med([full[i] / ar_step[i] for i in reps]),
                    "ar_compile_s": compile_s[ar_name], "spec_compile_s": compile_s[name],
                    "pieces_ms": {n: 1e3 * med(v) for n, v in pc.items()},
                    "per_repetition": {"ar_step_s": ar_step, "round_s": round_s, "pieces_s": pc},
                    "timings": {k: t[k].summary() for k in (f"{name}_long", f"{name}_short", f"{ar_name}_long", f"{ar_name}_short")},
                }
                rows.append(row)
                log(f"  {name} B={B}: tau {row['tau']:.2f} rho {row['rho']:.3f} rho_ideal {row['rho_ideal']:.3f} "
                    f"efficiency {row['engine_efficiency']:.3f} speedup {row['speedup']:.2f}")
    return {"rows": rows, "target_params": bigram.num_params, "mtp_params": drafts["oracle"].num_params,
            "config": config_dict(SMALL)}


# -------------------------------------------------------------------------------------------------- AOT


def abstract_sharded(make, mesh):
    """Graph definition and parameters of `make()` as sharded `ShapeDtypeStruct`s (no allocation)."""
    graphdef, state = nnx.split(nnx.eval_shape(make))

    def place(var):
        value = var.get_value()
        spec_ = sharding.partition_spec(value.shape, var.get_metadata().get("axes"), mesh)
        return var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=NamedSharding(mesh, spec_)))

    return graphdef, jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def per_device_bytes(tree) -> int:
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape)
        total += int(np.prod(shape, dtype=np.int64)) * x.dtype.itemsize
    return total


def total_bytes(tree) -> int:
    return sum(int(np.prod(x.shape, dtype=np.int64)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def aot_one(dtype, K, batch, cache_len, mesh) -> dict:
    dt = jnp.dtype(dtype)
    cfg = V3_671B
    tg, tp = abstract_sharded(lambda: DeepseekV3Model(cfg, Init(nnx.Rngs(0), dt)), mesh)
    mcfg = MTPConfig(target=cfg, layer=cfg.num_layers, max_draft_length=max(KS))
    pg, pp = abstract_sharded(lambda: MTPProposer(mcfg, Init(nnx.Rngs(0), dt)), mesh)
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
    return {
        "dtype": str(dt), "K": K, "batch": batch, "capacity": capacity, "mesh": dict(mesh.shape),
        "target_params": sum(x.size for x in jax.tree.leaves(tp)), "mtp_params": sum(x.size for x in jax.tree.leaves(pp)),
        "lower_s": lower_s, "compile_s": compile_s,
        "params_per_device_gib": (per_device_bytes(tp) + per_device_bytes(pp)) / gib,
        "params_total_gib": (total_bytes(tp) + total_bytes(pp)) / gib,
        "target_cache_total_gib": total_bytes(caches) / gib,
        "target_cache_per_device_gib": per_device_bytes(caches) / gib,
        "cache_numbers_per_token": sum(int(np.prod(x.shape[-2:])) * x.shape[0] for x in jax.tree.leaves(caches)),
        "mtp_state_per_device_gib": per_device_bytes(state.proposer_state) / gib,
        "state_per_device_gib": per_device_bytes(state) / gib,
        "xla_argument_gib": m.argument_size_in_bytes / gib,
        "xla_output_gib": m.output_size_in_bytes / gib,
        "xla_alias_gib": m.alias_size_in_bytes / gib,
        "xla_temp_gib": m.temp_size_in_bytes / gib,
    }


def aot_worker(args) -> int:
    mesh = sharding.make_mesh(data=1, model=8)
    log(f"devices: {len(jax.devices())} ({jax.devices()[0].platform}), mesh {dict(mesh.shape)}")
    out = []
    for dtype in ("bfloat16", "float32"):
        for K in KS:
            r = aot_one(dtype, K, args.aot_batch, args.aot_cache, mesh)
            log(f"  {dtype} K={K}: compile {r['compile_s']:.1f}s, params/device {r['params_per_device_gib']:.1f} GiB, "
                f"XLA arguments {r['xla_argument_gib']:.1f} GiB, temp {r['xla_temp_gib']:.1f} GiB")
            out.append(r)
    print("DEEPSEEK_AOT " + json.dumps(out), flush=True)
    return 0


def aot(args) -> list[dict]:
    """Run the AOT part in a fresh process with 8 forced CPU devices."""
    cmd = [sys.executable, __file__, "--part", "aot-worker", "--aot-batch", str(args.aot_batch), "--aot-cache", str(args.aot_cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    sys.stderr.write(proc.stderr[-4000:])
    for line in proc.stdout.splitlines():
        if line.startswith("DEEPSEEK_AOT "):
            return json.loads(line[len("DEEPSEEK_AOT "):])
    raise SystemExit(f"AOT worker failed (exit {proc.returncode})")


# ------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="all", choices=["all", "speed", "aot", "aot-worker"])
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--piece-calls", type=int, default=3)
    p.add_argument("--unroll-layers", action="store_true", help="decode loops run the layers unrolled (generate(unroll_layers=True))")
    p.add_argument("--aot-batch", type=int, default=8)
    p.add_argument("--aot-cache", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.part == "aot-worker":
        return aot_worker(args)

    meta = {"machine": bench.machine(), "dtype_speed": "float32", "Ks": KS, "temperature": 0.0,
            "repetitions": args.repetitions, "piece_calls": args.piece_calls, "prompt_len": args.prompt_len,
            "budgets": BUDGETS, "capacity_new_tokens": CAPACITY_NEW, "unroll_layers": args.unroll_layers,
            "aot_config": config_dict(V3_671B), "prompts": f"uniform random token ids (seed {args.seed})"}
    log(f"machine: {meta['machine']['cpu_model']} x{meta['machine']['cpu_cores']}, load {meta['machine']['load_average']}")
    data, tables = {}, []
    if args.part in ("all", "aot"):
        data["aot"] = rows = aot(args)
        tables.append(bench.Table(
            f"One speculative round at DeepSeek-V3-671B shapes, AOT on a forced 8-device CPU mesh (data 1 x model 8), "
            f"batch {args.aot_batch}, cache {args.aot_cache} tokens",
            ["dtype", "K", "params (B)", "params GiB/device", "latent cache GiB (per device)", "cache numbers/token",
             "MTP state GiB/device", "XLA arguments GiB", "XLA outputs GiB", "XLA temp GiB", "lower s", "compile s"],
            [[r["dtype"], r["K"], (r["target_params"] + r["mtp_params"]) / 1e9, r["params_per_device_gib"],
              r["target_cache_per_device_gib"], r["cache_numbers_per_token"], r["mtp_state_per_device_gib"],
              r["xla_argument_gib"], r["xla_output_gib"], r["xla_temp_gib"], r["lower_s"], r["compile_s"]] for r in rows],
            note=("params: target + MTP module (its embedding and head copies included). Per-device bytes from each "
                  "array's sharding; XLA's numbers from `compiled.memory_analysis()` (arguments = parameters + state, "
                  "outputs alias the donated state). cache numbers/token: latent + rotary key over all layers (61 x 576); "
                  "the latent cache has one KV 'head', so on a data-1 mesh every model shard holds all of it. "
                  "bf16 temp on XLA:CPU includes f32 copies of bf16 weights (no bf16 dot on CPU); the float32 compile "
                  "shows the activation temp."),
        ))
    if args.part in ("all", "speed"):
        data["speed"] = res = speed(args)
        rows = res["rows"]
        tables.append(bench.Table(
            f"AR vs speculative with the MTP module (fp32, {res['target_params'] / 1e6:.0f}M-param V3-shaped target, "
            f"16 experts, temperature 0, interleaved)",
            ["arm", "batch", "K", "tau", "AR tok/s", "spec tok/s", "speedup", "rho", "rho_ideal", "efficiency",
             "rho_pieces", "AR step ms", "round ms", "AR compile s", "spec compile s"],
            [[r["arm"], r["batch"], r["K"], r["tau"], r["ar_tok_s"], r["spec_tok_s"], r["speedup"], r["rho"], r["rho_ideal"],
              r["engine_efficiency"], r["rho_pieces"], r["ar_step_ms"], r["spec_round_ms"], r["ar_compile_s"],
              r["spec_compile_s"]] for r in rows],
            note=("medians over repetitions. tok/s of the decode loop ((tokens_long - tokens_short) / (t_long - t_short)); "
                  "compile s: lowering + compiling the whole loop ahead of time (the random arms run the same programs); "
                  "rho = round time / AR step time; rho_ideal = (target pass over K+1 tokens + the K chained MTP steps, each "
                  "jitted and timed alone) / AR step; efficiency = rho_ideal / rho; rho_pieces adds the MTP context update."),
        ))
        tables.append(bench.Table(
            "Pieces of a round (ms, medians, timed alone at a committed length of prompt + 64)",
            ["arm", "batch", "AR step (loop)", "target 1 token", "target K+1 verify", "MTP propose (K steps)",
             "MTP extend (K+1 rows)", "round (loop)"],
            [[r["arm"], r["batch"], r["ar_step_ms"], r["pieces_ms"]["target_1"], r["pieces_ms"]["target_verify"],
              r["pieces_ms"]["propose"], r["pieces_ms"]["extend"], r["spec_round_ms"]] for r in rows],
        ))
    meta["load_average_end"] = list(os.getloadavg())
    name = "deepseek" if args.part == "all" else f"deepseek_{args.part}"
    _, md_path = bench.write_report(
        args.out, name, title="DeepSeek-V3 + MTP: speculative decoding and the full-size AOT compile", tables=tables,
        meta=meta, data=data,
        intro=f"{meta['machine']['cpu_model']} ({meta['machine']['cpu_cores']} cores), jax {meta['machine']['versions']['jax']}; "
              f"load average {meta['machine']['load_average'][0]:.1f} at start, {meta['load_average_end'][0]:.1f} at end.",
    )
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
