"""The `dspark-jax` command.

Subcommands live in their own modules, each with `add_arguments(parser)` and `run(args) -> int`; this file
only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dspark_jax.errors import DSparkError

# name -> (module, one-line help)
COMMANDS = {
    "generate": ("dspark_jax.tools.commands.generate", "generate text for one prompt (AR or speculative), print text and stats"),
    "convert": ("dspark_jax.tools.commands.convert", "convert an HF checkpoint directory into an orbax checkpoint"),
    "batch": ("dspark_jax.tools.commands.batch", "answer a JSONL file of prompts (resumable, one JSON line per prompt)"),
    "bench": ("dspark_jax.tools.commands.bench", "benchmark report: acceptance per prompt set, AR vs speculative speed, PNG plots"),
    "build-cache": ("dspark_jax.tools.commands.build_cache", "run a target over training data into a target cache (resumable)"),
    "train-draft": ("dspark_jax.tools.commands.train_draft", "train or resume a DSpark / DFlash draft from a YAML recipe"),
    "profile": ("dspark_jax.tools.commands.profile", "measure schedule=auto's verify/draft costs on this machine, store them"),
    "calibrate": ("dspark_jax.tools.calibrate", "fit STS confidence temperatures / acceptance rates of a draft (calibration.json)"),
    "build-fixture": ("dspark_jax.tools.commands.build_fixture", "train the built-in target + DSpark/DFlash pair from scratch"),
    "plan": ("dspark_jax.tools.commands.plan", "will it fit a TPU slice, how fast: compile for it ahead of time from configs"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspark-jax", description="DSpark speculative decoding in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except DSparkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
