"""`dspark-jax train-draft --config RECIPE.yaml`: train (or resume) a DSpark / DFlash draft from a target cache."""

from __future__ import annotations


def add_arguments(parser):
    parser.add_argument("--config", required=True, help="training recipe (YAML), e.g. configs/fixture_dspark.yaml")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe value (dotted key, YAML value), e.g. --set optimizer.lr=1e-3 --set steps=100",
    )
    parser.add_argument("--export-dtype", default=None, help="stored dtype of the exported draft (default: the recipe's)")


def parse_overrides(items):
    import yaml

    from dspark_jax.errors import InputError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optimizer.lr=1e-3")
        out[key.strip()] = yaml.safe_load(value)
    return out


def run(args) -> int:
    from dspark_jax.training.recipe import load_recipe
    from dspark_jax.training.trainer import DraftTrainer

    recipe = load_recipe(args.config, parse_overrides(args.set))
    trainer = DraftTrainer(recipe)
    records = trainer.train()
    path = trainer.export(dtype=args.export_dtype)
    if records and "eval" in records[-1]:
        print(f"final evaluation: {records[-1]['eval']}")
    print(f"metrics: {recipe.output / 'metrics.jsonl'}")
    print(f"wrote draft {path}")
    return 0
