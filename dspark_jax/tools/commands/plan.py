"""`dspark-jax plan`: will a target (and its draft) fit a TPU slice at a batch and context, and how fast might it run?

Compiles the AR step and, with a draft, the speculative round for the slice ahead of time from the configs alone
(`dspark_jax.aot`, docs/tpu.md: no weights, no TPU; libtpu is needed), then prints per-chip memory, whether it
fits, the largest batch that fits at that context, and the estimated step and round times.

The largest batch comes from an analytic model validated against compiles (docs/tpu.md §5): per-chip bytes of the
larger program (the round with a draft) are linear in the batch, `a + b x batch`, fitted through two compiles; the
batch it predicts is compiled, and halved towards the last fitting batch until a compile fits.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--target", default=None,
                        help="target config.json, a checkpoint directory holding one, or a hub id owner/name (only its "
                             "config.json is read; default: the built-in target)")
    parser.add_argument("--draft", default="none",
                        help="draft config.json or directory, a built-in draft name (dspark, dflash, eagle3), a DeepSeek "
                             "target directory for its MTP module, or 'none' (AR only, the default)")
    parser.add_argument("--topology", required=True, help="TPU slice, e.g. v5e:1x1, v5e:2x2, v6e:2x4, v5p:2x2x2")
    parser.add_argument("--mesh", default=None, help="data=D,model=M over the slice's devices (default: all on model)")
    parser.add_argument("--batch", type=int, required=True, help="rows decoded together")
    parser.add_argument("--context", type=int, required=True, help="cache positions per row (prompt + generated)")
    parser.add_argument("--dtype", default="bfloat16", help="parameter and cache dtype (bfloat16, float16, float32)")
    parser.add_argument("--k", type=int, default=None, help="draft tokens per round (default: the draft's block size)")
    parser.add_argument("--max-batch", type=int, default=1024, help="the largest batch the search tries (default 1024)")
    parser.add_argument("--no-search", action="store_true", help="skip the largest-batch search (2-4 more compiles)")
    parser.add_argument("--json", default=None, help="also write the plan as JSON to this path")


def _draft_arg(value):
    from dspark_jax import assets
    from dspark_jax.tools.commands.common import BUILTIN_DRAFTS

    if value is None or str(value).lower() == "none":
        return None
    if str(value).lower() in BUILTIN_DRAFTS and not Path(value).exists():
        return getattr(assets, f"{str(value).upper()}_DRAFT")
    return value


def _gib(b) -> str:
    return f"{b / 2**30:.2f} GiB"


def _ms(seconds) -> str:
    return f"{1e3 * seconds:.2f} ms"


def run(args) -> int:
    from dspark_jax import aot, assets
    from dspark_jax.errors import InputError

    for name in ("batch", "context", "max_batch"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.k is not None and args.k < 1:
        raise InputError(f"--k {args.k} must be >= 1")
    topo = aot.topology(args.topology)
    data, _ = aot.parse_mesh(args.mesh, len(topo.devices))  # checked before any compile
    target = aot.target_config(args.target if args.target is not None else assets.TARGET)
    draft_value = _draft_arg(args.draft)
    draft = aot.draft_config(draft_value, target, args.k) if draft_value is not None else None
    common = dict(topology=topo, mesh=args.mesh, capacity=args.context, dtype=args.dtype)

    def build(program, batch):
        d = draft if program == "spec_round" else None
        return aot.report(aot.compile(target, d, program, batch=batch, K=args.k if d is not None else None, **common))

    reports = {"ar_step": build("ar_step", args.batch)}
    if draft is not None:
        reports["spec_round"] = build("spec_round", args.batch)
    limiting = "spec_round" if draft is not None else "ar_step"
    fits = all(r.fits for r in reports.values())
    plan = {"topology": topo.name, "mesh": reports["ar_step"].mesh, "batch": args.batch, "context": args.context,
            "dtype": args.dtype, "hbm_per_device_bytes": reports[limiting].hbm_bytes, "fits": fits,
            "programs": {k: r.to_json() for k, r in reports.items()}}
    for r in reports.values():
        print(r.summary())
    if not args.no_search:
        plan["largest_batch"], plan["search"] = _largest_batch(build, limiting, reports[limiting], args, data)
    print()
    print(f"{topo.name}, mesh {plan['mesh']}, batch {args.batch} x context {args.context} ({args.dtype}): "
          f"{'fits' if fits else 'does NOT fit'} ({_gib(reports[limiting].hbm_bytes)} usable per chip)")
    if "largest_batch" in plan:
        best, search = plan["largest_batch"], plan["search"]
        capped = " (the search's cap, --max-batch)" if best >= args.max_batch else ""
        print(f"largest batch that fits at context {args.context}: {best or 'none'}{capped} "
              f"[{search['method']}; compiled at {', '.join(str(b) for b, _ in search['compiled'])}]")
    for name, label in (("ar_step", "AR step"), ("spec_round", "speculative round")):
        r = reports.get(name)
        if r is None:
            continue
        if r.xla_estimate_s is None:
            print(f"{label}: roofline {_ms(r.roofline_s)}; no XLA estimate (it does not fit)")
            continue
        lo, hi = r.xla_estimate_s
        print(f"{label}: estimated {_ms(lo)}-{_ms(hi)} by XLA:TPU's cycle estimates, roofline {_ms(r.roofline_s)} "
              f"(weights + KV to {r.used_extent} positions); {r.whole_cache_copies} whole-cache copies")
    if args.json:
        Path(args.json).write_text(json.dumps(plan, indent=2, default=str))
    return 0


def _largest_batch(build, program, first, args, data: int):
    """(largest fitting batch or 0, how it was found): the linear model a + b x batch through two compiles, validated
    by compiling its prediction (halving towards the last fitting batch when that does not fit)."""
    compiled: list[tuple[int, bool]] = [(args.batch, first.fits)]
    step = max(1, data)
    points = {}
    if first.fits:
        points[args.batch] = first.total_bytes
    else:  # shrink until something fits
        b = args.batch
        while b > step and not points:
            b = max(step, (b // 2) // step * step)
            r = build(program, b)
            compiled.append((b, r.fits))
            if r.fits:
                points[b] = r.total_bytes
        if not points:
            return 0, {"method": "compiles: nothing fits", "compiled": compiled}
    lo = max(points)
    if len(points) < 2:
        other = min(lo * 2, args.max_batch)
        if other == lo:
            return lo, {"method": "compile at the cap", "compiled": compiled}
        r = build(program, other)
        compiled.append((other, r.fits))
        if r.fits:
            points[other] = r.total_bytes
        else:
            return _bisect(build, program, lo, other, compiled, step)
    (b1, m1), (b2, m2) = sorted(points.items())[-2:]
    hbm = first.hbm_bytes
    per_row = max((m2 - m1) / (b2 - b1), 1.0)
    predicted = int((hbm - (m1 - per_row * b1)) // per_row)
    predicted = min(args.max_batch, max(step, predicted // step * step))
    best = max(b for b in points)
    if predicted <= best:
        return best, {"method": "linear model from compiles", "bytes_per_row": per_row, "compiled": compiled}
    r = build(program, predicted)
    compiled.append((predicted, r.fits))
    if r.fits:
        return predicted, {"method": "linear model from compiles, prediction compiled and fits", "bytes_per_row": per_row,
                           "compiled": compiled}
    found, info = _bisect(build, program, best, predicted, compiled, step)
    info["bytes_per_row"] = per_row
    return found, info


def _bisect(build, program, good: int, bad: int, compiled, step: int, budget: int = 3):
    """Halve the gap between a fitting and a failing batch, at most `budget` more compiles."""
    for _ in range(budget):
        mid = (good + bad) // 2 // step * step
        if mid <= good:
            break
        r = build(program, mid)
        compiled.append((mid, r.fits))
        good, bad = (mid, bad) if r.fits else (good, mid)
    return good, {"method": "linear model from compiles, then bisection by compiles", "compiled": compiled}
