"""`dspark-jax generate --prompt TEXT`: one prompt, printed text and decoding statistics."""

from __future__ import annotations

from dspark_jax.tools.commands.common import add_model_arguments, add_sampling_arguments, load_models


def add_arguments(parser):
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the chat template")
    parser.add_argument("--schedule", choices=("auto", "fixed"), default="auto",
                        help="auto: verify only the drafted prefix worth its cost (possibly none); fixed: the whole block")


def run(args) -> int:
    import dspark_jax as dj
    from dspark_jax.tokenizer import check_text

    check_text(args.prompt, "--prompt")  # before loading anything
    target, draft = load_models(args)
    tok = target.tokenizer
    text = args.prompt
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True, enable_thinking=False)
    ids = tok.encode(text, add_special_tokens=not args.chat)  # raw text as `tokenizer(text)`; the template wrote its own
    result = dj.generate(
        target,
        draft,
        [ids],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        confidence_threshold=args.confidence_threshold,
        draft_length=getattr(args, "draft_length", None),
        schedule=args.schedule,
        sampler=args.sampler,
    )
    s = result.stats
    print(tok.decode(result.tokens[0]))
    print("---")
    mode = "AR" if draft is None else f"speculative (K={max(1, len(s.prefix_survival))})"
    print(f"mode: {mode}  tokens: {s.num_generated[0]}  finish: {s.finish_reasons[0]}  rounds: {s.rounds[0]}")
    if draft is not None:
        survival = " ".join("-" if x is None else f"{x:.2f}" for x in s.prefix_survival)
        print(f"mean acceptance length (tau): {s.mean_acceptance_length:.3f}  verify rate: {s.verify_rate:.3f}")
        print(f"prefix survival by position: {survival}")
        print(f"drafts verified per round ({args.schedule} schedule): {s.draft_tokens_per_proposal:.2f}")
        if args.schedule == "auto" and not any(n > 0 for row in s.proposal_lengths for n in row):
            from dspark_jax.engine import generation, schedule

            plan, _ = generation.schedule_plan(target, draft, 1, max(1, len(s.prefix_survival)))
            print(schedule.describe_plain(plan, max(1, len(s.prefix_survival))))
    print(f"wall time: {s.wall_time_s:.3f}s (includes compilation)  tokens/s: {s.tokens_per_second:.1f}")
    return 0
