"""`dspark-jax build-cache`: run a target over a JSONL of conversations / text into a target cache for training."""

from __future__ import annotations

import sys


def add_arguments(parser):
    parser.add_argument("--target", required=True, help="target checkpoint directory (HF format, with tokenizer)")
    parser.add_argument("--data", required=True, help='JSONL: {"conversations": [...]} or {"text": ...} per line')
    parser.add_argument("--out", required=True, help="cache directory (re-running resumes an interrupted build)")
    parser.add_argument("--layers", required=True, help="target layer ids of the draft's features, e.g. 1,9,17,25,33")
    parser.add_argument("--max-length", type=int, default=4096, help="truncate samples to this many tokens")
    parser.add_argument("--min-loss-tokens", type=int, default=14, help="drop samples with fewer supervised tokens")
    parser.add_argument("--hidden-dtype", default="bfloat16", help="stored feature dtype: bfloat16 or float32")
    parser.add_argument("--system-prompt", default=None, help="system prompt prepended to conversations without one")
    parser.add_argument("--dtype", default="float32", help="dtype the target runs in")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per target forward")


def run(args) -> int:
    import dspark_jax as dj
    from dspark_jax.errors import InputError
    from dspark_jax.training.data import read_jsonl, tokenize_record
    from dspark_jax.training.target_cache import build_cache

    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError as e:
        raise InputError(f"--layers {args.layers!r}: expected comma-separated integers, e.g. 1,9,17") from e
    target = dj.load_target(args.target, dtype=args.dtype)
    tok = target.tokenizer
    total = sum(1 for _ in read_jsonl(args.data))
    truncated = 0

    def samples():
        nonlocal truncated
        for record in read_jsonl(args.data):
            ids, mask = tokenize_record(tok, record, max_length=sys.maxsize, default_system_prompt=args.system_prompt)
            if len(ids) > args.max_length:
                truncated += 1
                ids, mask = ids[: args.max_length], mask[: args.max_length]
            yield ids, mask

    cache = build_cache(target, samples(), args.out, target_layer_ids=layers, hidden_dtype=args.hidden_dtype,
                        min_loss_tokens=args.min_loss_tokens, batch_tokens=args.batch_tokens, total=total,
                        metadata={"target_model_name_or_path": str(args.target), "source_jsonl_paths": [str(args.data)],
                                  "max_length": args.max_length})
    print(f"wrote {len(cache)} samples ({int(cache.lengths.sum())} tokens) to {args.out}; of {total} records, "
          f"{total - len(cache)} dropped (fewer than --min-loss-tokens {args.min_loss_tokens} supervised tokens) and "
          f"{truncated} truncated to --max-length {args.max_length} (this run)")
    return 0
