"""The library's programs compiled for TPU slices ahead of time, on this CPU-only machine (`dspark_jax.aot`, docs/tpu.md).

For each (model pair, topology, program, batch, cache) row: per-chip bytes (arguments, temporaries, outputs, aliases),
whether it fits the chip's HBM, whole-cache copies in the optimized TPU HLO, the roofline step time (weights + KV
at the used extent / HBM bandwidth) and XLA:TPU's own cycle estimate summed over the program as it executes
(docs/tpu.md §3), with the compile time. Real-size compiles take 1-5 minutes each on 2 cores: pick a subset, and
results are appended to the JSON as each row finishes (re-running skips rows already there unless --force).

    python benchmarks/tpu_aot.py --models qwen3-8b --topologies v5e:2x2 --programs ar_step,spec_round --batches 1,8
    python benchmarks/tpu_aot.py --models qwen3-4b --topologies v5e:1x1 --programs ar_step --batches 8
    python benchmarks/tpu_aot.py --label after --out benchmarks/results/tpu_aot   # writes tpu_aot.json / .md

Models: qwen3-4b, qwen3-8b, qwen3-14b (each with a DSpark draft of the released shape: 5 target-shaped layers,
Markov rank 256, confidence head, block 7), gemma4-12b (Gemma-4-12B, `gemma4_unified`, with its released DSpark
draft, K = 7; `gemma4_12b` and `gemma4_draft` in this file say where each number comes from), deepseek-v3 (671B +
its MTP module, K = 1), deepseek-v4-flash (+ its MTP module, K = 1). Topologies: v5e:1x1, v5e:2x2, v6e:1x1, v6e:2x4, v5p:2x2x1, v5p:4x4x4 (any `aot.topology` name).
The mesh is data=1, model=<devices> unless --mesh is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from dspark_jax import aot  # noqa: E402
from dspark_jax.models.gemma4 import FULL, SLIDING, Gemma4Config  # noqa: E402
from dspark_jax.models.qwen3 import Qwen3Config  # noqa: E402
from dspark_jax.proposers.dspark import DraftConfig  # noqa: E402
from dspark_jax.testing import synthetic  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def qwen3(hidden, layers, heads, intermediate, tied) -> Qwen3Config:
    return Qwen3Config(model_type="qwen3", vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate,
                       num_layers=layers, num_heads=heads, num_kv_heads=8, head_dim=128, tie_word_embeddings=tied,
                       max_position_embeddings=40960)


def dspark_draft(target: Qwen3Config):
    """The released DSpark draft's shape for a Qwen3 target (/work/shared/design/real_shapes.json: 5 layers, fc over 5
    target layers, Markov rank 256, a confidence head over hidden + rank)."""
    return synthetic.draft_config_for(target, num_layers=5, block_size=7, markov_rank=256, confidence=True)


def gemma4_12b() -> Gemma4Config:
    """Gemma-4-12B's text decoder (`gemma4_unified`), from the design notes (docs of the shared design folder:
    dspark_reference.md "Real Gemma-4-12B text config", target_families.md §1.2): 48 layers in the pattern
    5 sliding : 1 full (8 times, so the last is full), hidden 3840, GeGLU MLP 15360, 16 query heads; sliding
    layers: head dim 256, 8 KV heads, window 1024, RoPE theta 1e4; full layers: head dim 512, 1 KV head
    (`num_global_key_value_heads`) with K = V (no value projection), proportional RoPE (theta 1e6, factor 0.25);
    final logits soft-capped at 30, RMSNorm eps 1e-6, vocabulary 262144, tied embeddings; no per-layer inputs,
    no KV sharing, no MoE (the 12B is the simple decoder). Not in those notes: max_position_embeddings, set to
    262144, the library's default for `gemma4_unified` (`models/gemma4/config.parse`); it sizes no array here
    (the cache capacity is the row's `cache`) and no RoPE scaling depends on it."""
    return Gemma4Config(model_type="gemma4_unified", vocab_size=262144, hidden_size=3840, intermediate_size=15360,
                        num_layers=48, num_heads=16, layer_types=((SLIDING,) * 5 + (FULL,)) * 8, sliding_window=1024,
                        head_dim=256, num_kv_heads=8, global_head_dim=512, num_global_kv_heads=1,
                        attention_k_eq_v=True, final_logit_softcapping=30.0, rms_norm_eps=1e-6,
                        tie_word_embeddings=True, max_position_embeddings=262144)


def gemma4_draft(target: Gemma4Config) -> DraftConfig:
    """The released DSpark draft for Gemma-4-12B (`dspark_gemma4_12b_block7`; its weight shapes in the design
    folder's real_shapes.json): 5 layers, each with the target's *global* geometry in every layer as DeepSpec's
    `Gemma4DSparkModel` builds it (q_proj [8192, 3840] = 16 heads x 512, k_proj [512, 3840] = 1 KV head x 512, no
    v_proj: K = V), full attention only, MLP 15360, its own LM head [262144, 3840]; fc [3840, 19200] reads 5 target
    layers, [5, 17, 29, 41, 46]; Markov rank 256 (vanilla: markov_w1 / w2 only); confidence head over hidden + rank
    ([1, 4096]); mask token 4, block 7 (dspark_reference.md). The backbone is the target's config with the
    fields `config.parse_draft_backbone` sets for such a draft (as tests/test_gemma4_spec.py builds one)."""
    backbone = dataclasses.replace(target, model_type="gemma4", num_layers=5, layer_types=(FULL,) * 5,
                                   sliding_window=512, head_dim=target.global_head_dim,
                                   num_kv_heads=target.num_global_kv_heads, tie_word_embeddings=False)
    return DraftConfig(backbone=backbone, block_size=7, target_layer_ids=(5, 17, 29, 41, 46),
                       num_target_layers=target.num_layers, mask_token_id=4, markov_rank=256,
                       markov_head_type="vanilla", enable_confidence_head=True, confidence_head_with_markov=True)


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"_{name}_bench", Path(__file__).parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def models() -> dict:
    """name -> (target config, draft config thunk, K)."""
    out = {}
    for name, args in {"qwen3-4b": (2560, 36, 32, 9728, True), "qwen3-8b": (4096, 36, 32, 12288, False),
                       "qwen3-14b": (5120, 40, 40, 17408, False)}.items():
        cfg = qwen3(*args)
        out[name] = (lambda cfg=cfg: cfg, lambda cfg=cfg: dspark_draft(cfg), 7)

    gemma = gemma4_12b()
    out["gemma4-12b"] = (lambda: gemma, lambda: gemma4_draft(gemma), 7)

    def v3():
        return _bench_module("deepseek").V3_671B

    def v3_mtp():
        from dspark_jax.proposers.mtp import MTPConfig

        cfg = v3()
        return MTPConfig(target=cfg, layer=cfg.num_layers, max_draft_length=1)

    def v4():
        return _bench_module("deepseek_v4").V4_FLASH

    def v4_mtp():
        from dspark_jax.proposers.mtp_v4 import V4MTPConfig

        return V4MTPConfig(target=v4(), max_draft_length=1)

    out["deepseek-v3"] = (v3, v3_mtp, 1)
    out["deepseek-v4-flash"] = (v4, v4_mtp, 1)
    return out


def machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "load_average": list(os.getloadavg()), **aot.versions()}


def row_key(r: dict) -> tuple:
    return (r["label"], r["model"], r["topology"], json.dumps(r["mesh"], sort_keys=True), r["program"], r["batch"],
            r["capacity"])


def _memory_space(i) -> int:
    """The memory space of an instruction's result (its first element for a tuple, as `copy-start`'s destination):
    `S(n)` in its layout, 0 (HBM) without one. XLA:TPU's memory-space assignment prefetches into S(1), on-chip memory."""
    m = re.match(r"\(?\w+\[[\d,]*\]\{([^}]*)\}", i.type_text)
    s = re.search(r"S\((\d+)\)", m.group(1)) if m else None
    return int(s.group(1)) if s else 0


def hlo_facts(p) -> dict:
    """What `aot.report` reads but does not keep: loops counted once by the estimator (no readable trip count, e.g.
    attention's key-block loop, whose trips follow the rows' used extent), instructions without an estimate, and
    which of the whole-cache-sized copies only move an array into on-chip memory (`copy-start` into S(1), a prefetch
    by memory-space assignment; such a copy may be of a weight as large as a cache array, not of a cache)."""
    if p.compiled is None:
        return {}
    text = p.hlo
    c = aot.estimate_cycles(text)
    copies = aot.whole_cache_copies(text, p.cache_copy_bytes) if p.cache_copy_bytes else []
    prefetch = [i for i in copies if _memory_space(i) != 0]
    return {"unknown_loops": c.unknown_loops, "instructions_without_estimate": c.instructions_without_estimate,
            "prefetch_copies": len(prefetch),
            "prefetch_shapes": sorted({i.type_text.split("{")[0].strip("(") for i in prefetch})}


def run_one(model: str, topo: str, mesh, program: str, batch: int, cache: int, label: str, dtype: str) -> dict:
    target, draft, K = models()[model]
    t0 = time.perf_counter()
    needs_draft = program in aot.NEEDS_DRAFT or program == "continuous"
    base = {"label": label, "model": model, "topology": topo, "program": program, "batch": batch, "capacity": cache,
            "dtype": dtype, "load_average_before": list(os.getloadavg())}
    try:
        p = aot.compile(target(), draft() if needs_draft else None, program, topology=topo, mesh=mesh, batch=batch,
                        capacity=cache, dtype=dtype, K=K if needs_draft else None)
    except Exception as e:  # a failure is a result too
        return base | {"mesh": mesh, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:400]}",
                       "wall_s": time.perf_counter() - t0}
    r = aot.report(p)
    out = base | {"mesh": r.mesh, "K": r.K, "fits": r.fits, "hbm_bytes": r.hbm_bytes, "memory": r.memory,
                  "total_bytes": r.total_bytes, "param_bytes": r.param_bytes, "cache_bytes": r.cache_bytes,
                  "whole_cache_copies": r.whole_cache_copies, "copy_executions": r.copy_executions, "copy_shapes": sorted(set(r.copy_shapes)),
                  "roofline_ms": 1e3 * r.roofline_s, "used_extent": r.used_extent,
                  "xla_estimate_ms": None if r.xla_estimate_s is None else [1e3 * x for x in r.xla_estimate_s],
                  "copy_estimate_ms": None if r.copy_estimate_s is None else [1e3 * x for x in r.copy_estimate_s],
                  "lower_s": p.lower_s, "compile_s": p.compile_s, "wall_s": time.perf_counter() - t0,
                  "notes": list(r.notes), **hlo_facts(p), "load_average_after": list(os.getloadavg())}
    return out


def load(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"machine": machine(), "rows": []}


def gib(b) -> str:
    return "-" if b is None else f"{b / aot.GIB:.2f}"


def render(data: dict) -> str:
    m = data["machine"]
    lines = [
        "# TPU ahead-of-time compiles (`benchmarks/tpu_aot.py`)",
        "",
        "Compiled on a CPU-only machine for the named TPU slices with `dspark_jax.aot` (abstract parameters from "
        "configs, placed by the library's sharding rules; docs/tpu.md). Per-chip GiB from XLA's memory analysis. "
        "`copies`: whole-cache copies in the optimized TPU HLO (instructions; in brackets, executions per run: loop "
        "bodies times trip counts). `roofline`: weights + KV "
        "to half the capacity over HBM bandwidth; `XLA est.`: XLA:TPU's per-instruction cycle estimates summed over the "
        "program as it executes (cheapest-costliest conditional branches), and the part in whole-cache copies; "
        "`roof/est`: roofline over the costliest estimate. bf16, K = 7 for Qwen3 / Gemma 4 + DSpark, 1 for DeepSeek "
        "+ MTP. "
        "Rows that record them (fields `prefetch_copies`, `unknown_loops` in the JSON) also show: in `copies`, how many "
        "of them are prefetches into on-chip memory (`copy-start` into memory space S(1), of a cache or of a weight as "
        "large as one) rather than copies within HBM; in `roof/est`, a `*` where the estimate counts loops without a "
        "readable trip count once (`unknown_loops` of them; attention's key-block loop is one, so the estimate holds "
        "one key block's cache reads per layer whatever the used extent, and the ratio overstates long-cache rows).",
        "",
        f"Machine: {m.get('platform')}, {m.get('cpus')} CPUs (shared), python {m.get('python')}; jax {m.get('jax')}, "
        f"jaxlib {m.get('jaxlib')}, libtpu {m.get('libtpu')}.",
        "",
        *([f"Trees: {', '.join(f'`{k}` = {v}' for k, v in data['trees'].items())}.", ""] if data.get("trees") else []),
        "| label | model | topology | mesh | program | batch | cache | fits | args | temp | out | alias | weights | KV | "
        "copies | roofline ms | XLA est. ms | in copies ms | roof/est | compile s | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        mesh = ",".join(f"{k}={v}" for k, v in (r.get("mesh") or {}).items()) if isinstance(r.get("mesh"), dict) \
            else str(r.get("mesh"))
        head = f"| {r['label']} | {r['model']} | {r['topology']} | {mesh} | {r['program']} | {r['batch']} | {r['capacity']} |"
        load_ = f"{r['load_average_before'][0]:.1f}"
        if "error" in r:
            lines.append(f"{head} error: {r['error'][:120]} |" + " |" * 13 + f" {load_} |")
            continue
        mem = r["memory"]
        if "arguments" in mem:
            memcols = f" {gib(mem['arguments'])} | {gib(mem['temporaries'])} | {gib(mem['outputs'])} | {gib(mem['aliases'])} |"
        else:  # XLA:TPU's message: "... required for HLO temporaries (21.82G) exceeds available HBM (15.75G)"
            need = re.findall(r"\(([\d.]+[KMGT])\)", mem.get("oom", ""))
            memcols = f" out of HBM: {' > '.join(need) if need else mem.get('oom', '')[:80]} | | | |"
        est = r["xla_estimate_ms"]
        cp = r["copy_estimate_ms"]
        copies_run = [f"{r['copy_executions']} run"] if r.get("copy_executions") else []
        copies_run += [f"{r['prefetch_copies']} prefetch"] if r.get("prefetch_copies") else []
        copies_run = f" ({'; '.join(copies_run)})" if copies_run else ""
        ratio = "-" if est is None else f"{r['roofline_ms'] / est[1]:.0%}"
        if est is not None and r.get("unknown_loops"):
            ratio += "*"
        lines.append(
            f"{head} {'yes' if r['fits'] else 'no'} |{memcols} {gib(r['param_bytes'])} | {gib(r['cache_bytes'])} | "
            f"{r['whole_cache_copies'] if r['fits'] else '-'}{copies_run} | {r['roofline_ms']:.2f} | "
            f"{'-' if est is None else f'{est[0]:.1f}-{est[1]:.1f}'} | {'-' if cp is None else f'{cp[0]:.1f}-{cp[1]:.1f}'} | "
            f"{ratio} | {r['compile_s']:.0f} | {load_} |")
    shapes = sorted({(r["model"], r["program"], s) for r in data["rows"] if r.get("copy_shapes") for s in r["copy_shapes"]})
    if shapes:
        lines += ["", "Shapes of the whole-cache copies (per device):", ""]
        lines += [f"* {m_} {p}: `{s}`" for m_, p, s in shapes]
    pre = sorted({(r["model"], r["program"], s) for r in data["rows"] if r.get("prefetch_shapes")
                  for s in r["prefetch_shapes"]})
    if pre:
        lines += ["", "Of those, prefetches into on-chip memory (per device):", ""]
        lines += [f"* {m_} {p}: `{s}`" for m_, p, s in pre]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen3-8b")
    p.add_argument("--topologies", default="v5e:2x2")
    p.add_argument("--mesh", default=None, help="data=D,model=M (default: every device on model)")
    p.add_argument("--programs", default="ar_step,spec_round")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--caches", default="4096")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--label", default="after", help="a name for this tree's rows (e.g. before / after)")
    p.add_argument("--out", default=str(RESULTS / "tpu_aot"), help="path without suffix: writes .json and .md")
    p.add_argument("--force", action="store_true", help="recompute rows already in the JSON")
    p.add_argument("--tree", default=None, help="what the label's tree is (e.g. a commit), recorded in the JSON")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = load(out.with_suffix(".json"))
    known = set(models())
    for name in args.models.split(","):
        if name not in known:
            raise SystemExit(f"unknown model {name!r}; known: {', '.join(sorted(known))}")
    for model in args.models.split(","):
        for topo in args.topologies.split(","):
            for program in args.programs.split(","):
                for batch in (int(b) for b in args.batches.split(",")):
                    for cache in (int(c) for c in args.caches.split(",")):
                        probe = {"label": args.label, "model": model, "topology": topo, "program": program, "batch": batch,
                                 "capacity": cache}
                        done = [x for x in data["rows"] if row_key(x | {"mesh": x.get("mesh")})[:3] == row_key(
                            probe | {"mesh": None})[:3] and x["program"] == program and x["batch"] == batch
                            and x["capacity"] == cache and "error" not in x]
                        if done and not args.force:
                            print(f"skip (in the JSON): {probe}", file=sys.stderr)
                            continue
                        print(f"[{time.strftime('%H:%M:%S')}] {probe}", file=sys.stderr, flush=True)
                        r = run_one(model, topo, args.mesh, program, batch, cache, args.label, args.dtype)
                        data = load(out.with_suffix(".json"))  # another run may have appended meanwhile
                        data["rows"] = [x for x in data["rows"] if row_key(x) != row_key(r)] + [r]
                        data["machine"] = machine() | {"load_average": r.get("load_average_before")}
                        if args.tree:
                            data.setdefault("trees", {})[args.label] = args.tree
                        out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
                        out.with_suffix(".md").write_text(render(data))
                        brief = {k: r.get(k) for k in ("fits", "whole_cache_copies", "roofline_ms", "xla_estimate_ms",
                                                       "copy_estimate_ms", "compile_s", "error")}
                        brief["total_gib"] = None if r.get("total_bytes") is None else r["total_bytes"] / aot.GIB
                        print(f"   -> {json.dumps(brief, default=str)}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
