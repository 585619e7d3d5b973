"""`dspark-jax convert SRC DST`: HF checkpoint directory -> orbax checkpoint that `load_target` accepts."""

from __future__ import annotations


def add_arguments(parser):
    parser.add_argument("src", help="HF checkpoint directory (config.json + safetensors)")
    parser.add_argument("dst", help="new output directory")
    parser.add_argument("--dtype", default="bfloat16", help="stored parameter dtype: bfloat16, float16 or float32")


def run(args) -> int:
    from dspark_jax.models.loading import convert_to_orbax

    out = convert_to_orbax(args.src, args.dst, dtype=args.dtype)
    print(f"wrote {out}")
    return 0
