"""`dspark-jax plan`: will a target (and its draft) fit a TPU slice at a batch and context, and how fast might it run?

Compiles the AR step and, with a draft, the speculative round for the slice ahead of time from the configs alone
(`dspark_jax.aot`, docs/tpu.md: no weights, no TPU; libtpu is needed), then prints per-chip memory, whether it
fits, the largest batch that fits at that context, and the estimated step and round times.

The largest batch comes from an analytic model validated against compiles (docs/tpu.md §5): per-chip bytes of the
larger program (the round with a draft) are linear in the batch, `a + b x batch`, fitted through two compiles; the
largest power-of-two batch it predicts is compiled, and bisected towards the last fitting batch if it does not fit.
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


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def _largest_batch(build, program, first, args, data: int):
    """(largest fitting batch or 0, how it was found). Batches are powers of two (the engine pads to one). The linear
    model a + b x batch goes through two compiles; its prediction is compiled, then bisected (over powers of two)
    towards the last fitting batch when it does not fit."""
    compiled: list[tuple[int, bool]] = [(first.batch, first.fits)]
    step = _pow2_floor(max(1, data))
    cap = _pow2_floor(args.max_batch)
    points = {}
    if first.fits:
        points[first.batch] = first.total_bytes
    else:  # shrink until something fits
        b = first.batch
        while b > step and not points:
            b //= 2
            r = build(program, b)
            compiled.append((b, r.fits))
            if r.fits:
                points[b] = r.total_bytes
        if not points:
            return 0, {"method": "compiles: nothing fits", "compiled": compiled}
    best = max(points)
    if len(points) < 2:
        other = min(best * 2, cap)
        if other <= best:
            return best, {"method": "compiled at the cap (--max-batch)", "compiled": compiled}
        r = build(program, other)
        compiled.append((other, r.fits))
        if not r.fits:
            return best, {"method": "compiles: twice the batch does not fit", "compiled": compiled}
        points[other] = r.total_bytes
        best = other
    (b1, m1), (b2, m2) = sorted(points.items())[-2:]
    per_row = max((m2 - m1) / (b2 - b1), 1.0)
    predicted = int((first.hbm_bytes - (m1 - per_row * b1)) // per_row)
    predicted = min(cap, max(step, _pow2_floor(predicted)))
    info = {"bytes_per_row": per_row, "fixed_bytes": m1 - per_row * b1, "predicted": predicted, "compiled": compiled}
    if predicted <= best:
        return best, info | {"method": "linear model from two compiles"}
    r = build(program, predicted)
    compiled.append((predicted, r.fits))
    if r.fits:
        return predicted, info | {"method": "linear model from two compiles; its prediction compiled and fits"}
    good, bad = best, predicted
    for _ in range(3):  # bisect over powers of two
        mid = 1 << ((good.bit_length() + bad.bit_length() - 2) // 2)
        if mid <= good:
            break
        r = build(program, mid)
        compiled.append((mid, r.fits))
        good, bad = (mid, bad) if r.fits else (good, mid)
    return good, info | {"method": "linear model from two compiles; its prediction did not fit: bisection by compiles"}
