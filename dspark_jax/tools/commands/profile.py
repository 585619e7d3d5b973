"""`dspark-jax profile`: measure the verify and draft costs of `schedule="auto"` on this machine and store them.

Without a stored profile, `generate` / `stream` / `batch` use the deterministic cost model (XLA's analysis of
the compiled round, docs/algorithm.md §4.4), which times nothing. Measuring is this explicit command: it
times the round's programs for each batch size asked for, stores the profile in
`$DSPARK_JAX_CACHE/profiles.json` (default `~/.cache/dspark_jax`) under its backend / device kind / target /
draft / batch / K key, and prints where. Later calls with exactly that key use it (they say so in one line).
"""

from __future__ import annotations

from dspark_jax.tools.commands.common import add_model_arguments, load_models


def add_arguments(parser):
    add_model_arguments(parser)
    parser.add_argument("--batch-size", default="1",
                        help="comma-separated batch sizes to profile (those of the later calls)")
    parser.add_argument("--budget-s", type=float, default=15.0,
                        help="seconds of timing per batch size (compiles included)")


def batch_sizes(text: str) -> list[int]:
    from dspark_jax.errors import InputError

    try:
        sizes = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--batch-size {text!r}: expected comma-separated positive integers") from None
    if not sizes or any(b < 1 for b in sizes):
        raise InputError(f"--batch-size {text!r}: expected comma-separated positive integers")
    return sizes


def run(args) -> int:
    import dspark_jax as dj
    from dspark_jax.errors import InputError

    sizes = batch_sizes(args.batch_size)  # before loading anything
    if not args.budget_s > 0:
        raise InputError(f"--budget-s {args.budget_s}: must be positive")
    target, draft = load_models(args)
    if draft is None:
        raise InputError("--draft none: plain AR has no schedule to profile")
    for B in sizes:
        costs, path = dj.profile(target, draft, batch_size=B, K=getattr(args, "draft_length", None),
                                 budget_s=args.budget_s)
        values = " / ".join(f"{v:.2f}" for v in costs.verify)
        print(f"batch {B}: verifying {values} AR steps, drafting {costs.draft:.2f}; stored in {path}")
    return 0
