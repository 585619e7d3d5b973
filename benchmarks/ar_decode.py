"""Autoregressive decoding: dspark_jax (`dj.generate(target, None, ...)`, whole loop compiled) vs transformers
`generate` on identical weights and prompts, in one run, arms interleaved (benchmarks.md).

One random-weight Qwen3 (~207M parameters, untied head) is built with `dj.Target.random`; the transformers
model gets the very same tensors (exported with our checkpoint writer's key map, loaded with
`load_state_dict(strict=True)`). bf16 weights are the fp32 ones rounded to nearest on both sides.

Decode-step time is separated from prefill by timing a long generation and a one-token generation (prefill
and the first sampled token) of the same prompts: step time = (t_long - t_short) / (n_long - n_short). Using
the whole long run keeps the estimate robust on a loaded machine (the subtracted prefill is small). The JAX
short run is its own compiled program with a smaller cache (the prompt plus 17 slots instead of 65), which
changes the prefill's cost by the attention over those extra masked slots only.

Roofline fraction = (weight bytes read per step / step time) / memory bandwidth. The bandwidth probes
(`dspark_jax.bench.bandwidth_probes`: a 1 GiB fp32 array summed by JAX and numpy, multiplied by a vector in
JAX, copied by numpy) are arms of the same interleaved repetitions, so they see the same machine load; the
bound is the best read-only probe of each repetition (a step only reads weights); the copy probe, which
counts bytes read plus bytes written, is reported as a second bound. Weight bytes per step are all parameters except the embedding
table (a step gathers B of its rows).

Every quoted number is the median over repetitions of a per-repetition value (step times, ratios, roofline
fractions), each computed from arms timed next to each other, which cancels most load drift between repetitions.

    python benchmarks/ar_decode.py                       # fp32 and bf16, batch 1 and 8
    python benchmarks/ar_decode.py --dtypes float32 --repetitions 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import dspark_jax as dj  # noqa: E402
from dspark_jax.models.qwen3 import Qwen3Config  # noqa: E402
from dspark_jax.tools import bench  # noqa: E402

RESULTS = Path(__file__).parent / "results"

# ~207M parameters: 12 layers of D=1024 (16 query heads, 8 KV heads of 64), SwiGLU 2816, vocab 32000, untied.
CONFIG = Qwen3Config(
    model_type="qwen3",
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_layers=12,
    num_heads=16,
    num_kv_heads=8,
    head_dim=64,
    tie_word_embeddings=False,
    max_position_embeddings=4096,
)

# Per dtype: (long, short) new-token budgets; the short run is prefill plus the first token.
BUDGETS = {"float32": (64, 1), "bfloat16": (32, 1)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def torch_model(target: dj.Target, dtype: str):
    """The transformers Qwen3 holding exactly `target`'s tensors (fp32), cast to `dtype`."""
    import torch
    import transformers

    from converters import qwen3
    from converters.export import export_tensors, qwen3_config_dict

    hf_config = transformers.Qwen3Config(**qwen3_config_dict(target.config))
    model = transformers.Qwen3ForCausalLM(hf_config)
    tensors = export_tensors(target.params, qwen3.rules(target.config))
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in tensors.items()}
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = None
    return model.to(getattr(torch, dtype)).eval()


def cast_target(target: dj.Target, dtype: str) -> dj.Target:
    """`target` with its parameters rounded to `dtype` (and a graph that computes in `dtype`)."""
    import jax.numpy as jnp
    from flax import nnx

    from dspark_jax.models import model_class

    cfg = target.config
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: model_class(cfg)(cfg, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))))
    params = jax.tree.map(lambda x: x.astype(dtype), target.params)
    return dj.Target(config=cfg, graphdef=graphdef, params=params, dtype=jnp.dtype(dtype))


def common_prefix(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def jax_arm(target, prompts, n):
    return lambda: dj.generate(target, None, prompts, max_new_tokens=n)


def jax_compile_seconds(target, prompts, n) -> float:
    """Ahead-of-time compile time of the program `dj.generate(target, None, prompts, max_new_tokens=n)` runs."""
    from dspark_jax.engine import decode, generation

    req, _, shapes = generation.build_requests(target, prompts, max_new_tokens=n, temperature=0.0, top_k=0, top_p=1.0, seed=0,
                                               stop_token_ids=None, confidence_threshold=0.0)
    return bench.compile_seconds(decode.generate_loop, target.graphdef, target.params, req, **shapes)


def hf_arm(model, prompts, n, threads: int | None = None):
    """transformers greedy `generate` of exactly `n` new tokens, with `threads` torch threads (None: torch's default)."""
    import torch

    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def call():
        default = torch.get_num_threads()
        torch.set_num_threads(threads or default)
        try:
            with torch.inference_mode():
                return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        finally:
            torch.set_num_threads(default)

    return call


# Sides of the comparison: dspark_jax, transformers with torch's default threads, transformers with one thread
# (on an oversubscribed machine torch's OpenMP barriers can make the default far slower; the faster of the two
# transformers configurations is the peer).
SIDES = ("jax", "hf", "hf1")
READ_PROBES = ("jax_sum", "numpy_sum", "jax_matvec")


def run_dtype(target: dj.Target, hf, dtype: str, batch_sizes, prompt_len: int, repetitions: int, seed: int, probes) -> list[dict]:
    n_long, n_short = BUDGETS[dtype]
    rng = np.random.default_rng(seed)
    weight_bytes = (target.num_params - CONFIG.vocab_size * CONFIG.hidden_size) * target.dtype.itemsize
    rows = []
    for B in batch_sizes:
        prompts = rng.integers(0, CONFIG.vocab_size, (B, prompt_len)).tolist()
        log(f"[{dtype}] batch {B}: long {n_long} / short {n_short} new tokens, {repetitions} repetitions")
        compile_s = jax_compile_seconds(target, prompts, n_long)
        arms = {}
        for n, which in ((n_long, "long"), (n_short, "short")):
            arms |= {f"jax_{which}": jax_arm(target, prompts, n), f"hf_{which}": hf_arm(hf, prompts, n),
                     f"hf1_{which}": hf_arm(hf, prompts, n, threads=1)}
        arms |= {f"bw_{name}": fn for name, (fn, _) in probes.items()}
        t = bench.interleave(arms, repetitions, log=log)
        jax_tokens = t["jax_long"].result.tokens
        hf_tokens = t["hf_long"].result[:, prompt_len:].tolist()
        assert all(len(r) == n_long for r in jax_tokens) and all(len(r) == n_long for r in hf_tokens)
        agree = [common_prefix(x, y) for x, y in zip(jax_tokens, hf_tokens, strict=True)]

        reps = range(repetitions)
        step = {side: [(t[f"{side}_long"].times_s[i] - t[f"{side}_short"].times_s[i]) / (n_long - n_short) for i in reps]
                for side in SIDES}
        gbs = {name: [moved / t[f"bw_{name}"].times_s[i] / 1e9 for i in reps] for name, (_, moved) in probes.items()}
        # A decode step streams weights in (reads only): the bound is the best read-only probe. The copy probe
        # (bytes read + bytes written) is reported as a second, more demanding bound.
        read = [max(gbs[name][i] for name in READ_PROBES) for i in reps]
        copy = gbs["numpy_copy"]
        peer = [min(step["hf"][i], step["hf1"][i]) for i in reps]
        med = statistics.median
        row = {"dtype": dtype, "batch": B, "prompt_len": prompt_len, "new_tokens_long": n_long, "new_tokens_short": n_short,
               "weight_bytes_per_step": weight_bytes, "jax_compile_s": compile_s,
               "jax_first_call_minus_median_s": t["jax_long"].compile_s, "greedy_tokens_equal_prefix": agree}
        for side in SIDES:
            row[f"{side}_step_s"] = med(step[side])
            row[f"{side}_decode_tok_s"] = B / med(step[side])
            row[f"{side}_end_to_end_tok_s"] = B * n_long / t[f"{side}_long"].median_s
            row[f"{side}_timings"] = {w: t[f"{side}_{w}"].summary() for w in ("long", "short")}
            row[f"{side}_weight_gbs"] = weight_bytes / med(step[side]) / 1e9
            row[f"{side}_roofline_fraction"] = med([weight_bytes / step[side][i] / 1e9 / read[i] for i in reps])
            row[f"{side}_roofline_fraction_vs_copy"] = med([weight_bytes / step[side][i] / 1e9 / copy[i] for i in reps])
        row["peer_decode_tok_s"] = B / med(peer)
        row["peer_end_to_end_tok_s"] = max(row["hf_end_to_end_tok_s"], row["hf1_end_to_end_tok_s"])
        row["decode_ratio_jax_over_hf"] = med([peer[i] / step["jax"][i] for i in reps])
        row["end_to_end_ratio_jax_over_hf"] = med([min(t["hf_long"].times_s[i], t["hf1_long"].times_s[i]) / t["jax_long"].times_s[i]
                                                   for i in reps])
        row["bandwidth_gbs"] = {name: med(v) for name, v in gbs.items()} | {"best_read": med(read)}
        row["bandwidth_gbs_per_repetition"] = gbs
        rows.append(row)
        log(f"  decode tok/s: jax {row['jax_decode_tok_s']:.1f}, hf {row['hf_decode_tok_s']:.1f}, hf 1 thread "
            f"{row['hf1_decode_tok_s']:.1f}; ratio {row['decode_ratio_jax_over_hf']:.2f}; roofline {row['jax_roofline_fraction']:.2f} "
            f"(read bandwidth {row['bandwidth_gbs']['best_read']:.1f} GB/s); greedy agreement {agree}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repetitions", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    import torch

    dtypes = args.dtypes.split(",")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    meta = {"machine": bench.machine(), "torch_threads": torch.get_num_threads(), "config": CONFIG.__dict__ | {"rope": CONFIG.rope.__dict__},
            "repetitions": args.repetitions, "prompt_len": args.prompt_len, "temperature": 0.0, "budgets": BUDGETS,
            "prompts": f"uniform random token ids (seed {args.seed}), all rows the same length"}
    log(f"machine: {meta['machine']['cpu_model']} x{meta['machine']['cpu_cores']}, load {meta['machine']['load_average']}")
    probes = bench.bandwidth_probes()
    meta["bandwidth_probe_bytes"] = {name: moved for name, (_, moved) in probes.items()}

    base = dj.Target.random(CONFIG, dtype="float32", seed=args.seed)
    meta["num_params"] = base.num_params
    rows = []
    for dtype in dtypes:
        target = base if dtype == "float32" else cast_target(base, dtype)
        hf = torch_model(base, dtype)
        assert sum(p.numel() for p in hf.parameters()) == base.num_params
        rows += run_dtype(target, hf, dtype, batch_sizes, args.prompt_len, args.repetitions, args.seed, probes)
        del hf, target
    meta["load_average_end"] = list(os.getloadavg())

    table = bench.Table(
        "AR decode: dspark_jax vs transformers (same weights, same prompts, interleaved)",
        ["dtype", "batch", "JAX decode tok/s", "HF decode tok/s", "HF 1-thread decode tok/s", "decode ratio", "JAX e2e tok/s",
         "HF best e2e tok/s", "e2e ratio", "JAX step ms", "JAX weight GB/s", "read bandwidth GB/s", "JAX roofline",
         "JAX roofline vs copy", "HF roofline", "HF 1-thread roofline", "JAX compile s", "greedy agree"],
        [[r["dtype"], r["batch"], r["jax_decode_tok_s"], r["hf_decode_tok_s"], r["hf1_decode_tok_s"], r["decode_ratio_jax_over_hf"],
          r["jax_end_to_end_tok_s"], r["peer_end_to_end_tok_s"], r["end_to_end_ratio_jax_over_hf"], 1e3 * r["jax_step_s"],
          r["jax_weight_gbs"], r["bandwidth_gbs"]["best_read"], r["jax_roofline_fraction"], r["jax_roofline_fraction_vs_copy"],
          r["hf_roofline_fraction"], r["hf1_roofline_fraction"], r["jax_compile_s"],
          f"{sum(x == r['new_tokens_long'] for x in r['greedy_tokens_equal_prefix'])}/{r['batch']}"]
         for r in rows],
        note=("medians over repetitions of per-repetition values. decode = per-step time (t_long - t_short) / (n_long - n_short), "
              "the short run being prefill + 1 token; e2e = n_long new tokens incl. prefill; ratios are JAX over the faster "
              f"transformers configuration of each repetition (torch default {torch.get_num_threads()} threads, or 1 thread); "
              "roofline = (non-embedding weight bytes / step time) / the best read-only bandwidth probe (JAX sum, numpy sum, "
              "JAX fp32 matvec) of the same repetition; 'vs copy' divides by the numpy copy probe (bytes read + written) instead; "
              "greedy agree = rows whose n_long greedy tokens are identical in both libraries."),
    )
    bw_table = bench.Table(
        "Memory bandwidth probes, interleaved with the arms (GB/s, median per section)",
        ["dtype", "batch", "JAX sum", "numpy sum", "JAX fp32 matvec", "numpy copy (r+w)", "best read-only"],
        [[r["dtype"], r["batch"]] + [r["bandwidth_gbs"][k] for k in ("jax_sum", "numpy_sum", "jax_matvec", "numpy_copy", "best_read")]
         for r in rows],
    )
    figure = Path(args.out) / "ar_decode.png"
    bench.bar_plot(figure, [f"{r['dtype']} B={r['batch']}" for r in rows],
                   {"dspark_jax": [r["jax_decode_tok_s"] for r in rows], "transformers": [r["hf_decode_tok_s"] for r in rows],
                    "transformers, 1 thread": [r["hf1_decode_tok_s"] for r in rows]},
                   ylabel="decode tokens/s", title=f"AR decode, {base.num_params / 1e6:.0f}M-param Qwen3")
    json_path, md_path = bench.write_report(
        args.out, "ar_decode", title="Autoregressive decode: dspark_jax vs transformers", tables=[table, bw_table],
        meta=meta, data={"rows": rows}, figures=[figure],
        intro=f"{base.num_params / 1e6:.1f}M-parameter random Qwen3, {meta['machine']['cpu_model']} "
              f"({meta['machine']['cpu_cores']} cores, load average {meta['machine']['load_average'][0]:.1f} at start, "
              f"{meta['load_average_end'][0]:.1f} at end), jax {meta['machine']['versions']['jax']}, "
              f"torch {meta['machine']['versions']['torch']}, transformers {meta['machine']['versions']['transformers']}; "
              f"{args.repetitions} interleaved repetitions; greedy.",
    )
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
