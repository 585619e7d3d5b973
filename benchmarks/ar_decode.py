"""Autoregressive decoding: dspark_jax (`dj.generate(target, None, ...)`, whole loop compiled) vs transformers
`generate` on identical weights and prompts, in one run, arms interleaved (benchmarks.md).

One random-weight Qwen3 (~207M parameters, untied head) is built with `dj.Target.random`; the transformers
model gets the very same tensors (exported with our checkpoint writer's key map, loaded with
`load_state_dict(strict=True)`). bf16 weights are the fp32 ones rounded to nearest on both sides.

Decode-step time is separated from prefill by timing a long and a short generation with the same prompts
and the same compiled program (both budgets fall in the same power-of-two bucket, so the JAX arm runs one
program with one cache capacity): step time = (t_long - t_short) / (n_long - n_short).

Roofline fraction at batch 1 = (weight bytes read per step / step time) / memory bandwidth, the bandwidth
measured in the same run (`dspark_jax.bench.memory_bandwidth`, before and after the arms). Weight bytes per
step are all parameters except the embedding table (a step gathers B of its rows).

    python benchmarks/ar_decode.py                       # fp32 and bf16, batch 1 and 8
    python benchmarks/ar_decode.py --dtypes float32 --repetitions 5
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import dspark_jax as dj  # noqa: E402
from dspark_jax import bench  # noqa: E402
from dspark_jax.config import Qwen3Config  # noqa: E402

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

# Per dtype: (long, short) token budgets; both in the same power-of-two bucket (one compiled program).
BUDGETS = {"float32": (128, 65), "bfloat16": (32, 17)}


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


def hf_arm(model, prompts, n):
    import torch

    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def call():
        with torch.inference_mode():
            return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    return call


def run_dtype(target: dj.Target, hf, dtype: str, batch_sizes, prompt_len: int, repetitions: int, seed: int) -> list[dict]:
    n_long, n_short = BUDGETS[dtype]
    rng = np.random.default_rng(seed)
    rows = []
    for B in batch_sizes:
        prompts = rng.integers(0, CONFIG.vocab_size, (B, prompt_len)).tolist()

        log(f"[{dtype}] batch {B}: long {n_long} / short {n_short} new tokens, {repetitions} repetitions")
        arms = {"jax_long": jax_arm(target, prompts, n_long), "hf_long": hf_arm(hf, prompts, n_long),
                "jax_short": jax_arm(target, prompts, n_short), "hf_short": hf_arm(hf, prompts, n_short)}
        t = bench.interleave(arms, repetitions, log=log)
        jax_tokens = t["jax_long"].result.tokens
        hf_tokens = t["hf_long"].result[:, prompt_len:].tolist()
        assert all(len(r) == n_long for r in jax_tokens) and all(len(r) == n_long for r in hf_tokens)
        agree = [common_prefix(x, y) for x, y in zip(jax_tokens, hf_tokens, strict=True)]

        row = {"dtype": dtype, "batch": B, "prompt_len": prompt_len, "new_tokens_long": n_long, "new_tokens_short": n_short}
        for side in ("jax", "hf"):
            s = (t[f"{side}_long"].median_s - t[f"{side}_short"].median_s) / (n_long - n_short)
            row[f"{side}_step_s"] = s
            row[f"{side}_decode_tok_s"] = B / s
            row[f"{side}_end_to_end_tok_s"] = B * n_long / t[f"{side}_long"].median_s
            row[f"{side}_prefill_s"] = t[f"{side}_long"].median_s - s * (n_long - 1)
            row[f"{side}_timings"] = {k.split("_", 1)[1]: t[k].summary() for k in arms if k.startswith(side)}
        row["jax_compile_s"] = t["jax_long"].compile_s
        row["decode_ratio_jax_over_hf"] = row["jax_decode_tok_s"] / row["hf_decode_tok_s"]
        row["end_to_end_ratio_jax_over_hf"] = row["jax_end_to_end_tok_s"] / row["hf_end_to_end_tok_s"]
        row["greedy_tokens_equal_prefix"] = agree
        rows.append(row)
        log(f"  jax {row['jax_decode_tok_s']:.1f} tok/s/step-decode, hf {row['hf_decode_tok_s']:.1f}; "
            f"ratio {row['decode_ratio_jax_over_hf']:.2f}; greedy agreement {agree}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repetitions", type=int, default=3)
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
    bandwidth_before = bench.memory_bandwidth()
    log(f"bandwidth before: {bandwidth_before}")

    base = dj.Target.random(CONFIG, dtype="float32", seed=args.seed)
    embed_params = CONFIG.vocab_size * CONFIG.hidden_size
    meta["num_params"] = base.num_params
    rows = []
    for dtype in dtypes:
        target = base if dtype == "float32" else cast_target(base, dtype)
        hf = torch_model(base, dtype)
        hf_params = sum(p.numel() for p in hf.parameters())
        assert hf_params == base.num_params, (hf_params, base.num_params)
        itemsize = target.dtype.itemsize
        weight_bytes = (base.num_params - embed_params) * itemsize
        for row in run_dtype(target, hf, dtype, batch_sizes, args.prompt_len, args.repetitions, args.seed):
            row["weight_bytes_per_step"] = weight_bytes
            rows.append(row)
        del hf, target

    bandwidth_after = bench.memory_bandwidth()
    log(f"bandwidth after: {bandwidth_after}")
    bound = max(bandwidth_before["best_gbs"], bandwidth_after["best_gbs"])
    matvec = max(bandwidth_before["jax_matvec_gbs"], bandwidth_after["jax_matvec_gbs"])
    for row in rows:
        for side in ("jax", "hf"):
            achieved = row["weight_bytes_per_step"] / row[f"{side}_step_s"] / 1e9
            row[f"{side}_weight_gbs"] = achieved
            row[f"{side}_roofline_fraction"] = achieved / bound
            row[f"{side}_roofline_fraction_vs_matvec"] = achieved / matvec

    table = bench.Table(
        "AR decode: dspark_jax vs transformers (same weights, same prompts, interleaved)",
        ["dtype", "batch", "JAX decode tok/s", "HF decode tok/s", "decode ratio", "JAX e2e tok/s", "HF e2e tok/s",
         "e2e ratio", "JAX step ms", "HF step ms", "JAX weight GB/s", "JAX roofline", "HF roofline", "JAX compile s",
         "greedy agree"],
        [[r["dtype"], r["batch"], r["jax_decode_tok_s"], r["hf_decode_tok_s"], r["decode_ratio_jax_over_hf"],
          r["jax_end_to_end_tok_s"], r["hf_end_to_end_tok_s"], r["end_to_end_ratio_jax_over_hf"], 1e3 * r["jax_step_s"],
          1e3 * r["hf_step_s"], r["jax_weight_gbs"], r["jax_roofline_fraction"], r["hf_roofline_fraction"], r["jax_compile_s"],
          f"{sum(x == r['new_tokens_long'] for x in r['greedy_tokens_equal_prefix'])}/{r['batch']}"] for r in rows],
        note=("decode = per-step time from (t_long - t_short) / (n_long - n_short); e2e = n_long new tokens incl. prefill; "
              "roofline = (non-embedding weight bytes / step time) / best measured bandwidth "
              f"({bench.rounded(bound)} GB/s; JAX fp32 matvec {bench.rounded(matvec)} GB/s); "
              "greedy agree = rows whose n_long greedy tokens are identical in both libraries."),
    )
    bw_table = bench.Table(
        "Memory bandwidth measured in the same run (GB/s)",
        ["when", "JAX sum", "numpy sum", "JAX fp32 matvec", "numpy copy (r+w)", "best"],
        [[w, b["jax_sum_gbs"], b["numpy_sum_gbs"], b["jax_matvec_gbs"], b["numpy_copy_gbs"], b["best_gbs"]]
         for w, b in (("before", bandwidth_before), ("after", bandwidth_after))],
    )
    meta["bandwidth"] = {"before": bandwidth_before, "after": bandwidth_after, "bound_gbs": bound}
    figure = Path(args.out) / "ar_decode.png"
    bench.bar_plot(figure, [f"{r['dtype']} B={r['batch']}" for r in rows],
                   {"dspark_jax": [r["jax_decode_tok_s"] for r in rows], "transformers": [r["hf_decode_tok_s"] for r in rows]},
                   ylabel="decode tokens/s", title=f"AR decode, {base.num_params / 1e6:.0f}M-param Qwen3")
    json_path, md_path = bench.write_report(
        args.out, "ar_decode", title="Autoregressive decode: dspark_jax vs transformers", tables=[table, bw_table],
        meta=meta, data={"rows": rows}, figures=[figure],
        intro=f"{base.num_params / 1e6:.1f}M-parameter random Qwen3, {meta['machine']['cpu_model']} "
              f"({meta['machine']['cpu_cores']} cores), jax {meta['machine']['versions']['jax']}, "
              f"torch {meta['machine']['versions']['torch']}, transformers {meta['machine']['versions']['transformers']}; "
              f"median of {args.repetitions} interleaved repetitions; greedy.",
    )
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
