"""`dspark-jax batch --input prompts.jsonl --output answers.jsonl`: a resumable batch generation job.

Input lines: `{"turns": [...]}` (prompt sets; the first turn is used), `{"prompt": "..."}` or
`{"messages": [{"role", "content"}...]}`, each optionally with `id` and per-line `temperature`, `top_k`,
`top_p`, `max_new_tokens`, `seed`. Output lines: `{"id", "text", "tokens", "finish_reason",
"acceptance_length", "rounds"}`, in completion order. Kill it at any time and rerun the same command to finish.

Several processes (hosts) run one job when every one of them runs the same command with
`--coordinator-address/--num-processes/--process-id` (or `--distributed`): requests are split over the mesh's
data axis, the model is sharded over its model axis, process 0 writes the one output file (`tools/distributed.py`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dspark_jax.tools import distributed
from dspark_jax.tools.commands.common import (
    add_model_arguments,
    add_sampling_arguments,
    draft_choice,
    make_draft,
    resolve_checkpoint,
    resolve_dtype,
)


def add_arguments(parser):
    parser.add_argument("--input", required=True, help="JSONL prompts: turns / prompt / messages lines")
    parser.add_argument("--output", required=True, help="JSONL answers; an existing file of the same job is resumed")
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=16,
                        help="decode slots (continuous) or prompts per generate call (static); float32 answers do not "
                             "depend on it, bfloat16 answers may, so a bf16 job resumes only with the same batch size")
    parser.add_argument("--batching", choices=("continuous", "static"), default="continuous",
                        help="continuous (default): --batch-size decode slots, each refilled with the next prompt as soon "
                             "as its answer ends; static: groups of --batch-size length-sorted prompts, each run to its "
                             "slowest answer")
    parser.add_argument("--schedule", choices=("auto", "fixed"), default="auto",
                        help="auto (default): verify per round only the drafted prefix worth its cost on this machine "
                             "(docs/algorithm.md); fixed: whole blocks. Under auto a sampled answer's realisation depends on "
                             "its batch, so the job resumes only with the same --batch-size")
    parser.add_argument("--no-chat", action="store_true", help="feed the raw text instead of applying the chat template")
    parser.add_argument("--strict", action="store_true", help="fail on the first malformed input line instead of skipping it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    distributed.add_arguments(parser)


def run(args) -> int:
    from dspark_jax.errors import DSparkError

    cluster = distributed.start(args)  # before anything initialises JAX's backends
    if not cluster.multi_process:
        return _job(args, cluster)
    try:
        code = _job(args, cluster)
    except DSparkError as e:
        print(f"error: {e}", file=sys.stderr)
        cluster.abort(f"{type(e).__name__}: {e}", 2)
    except BaseException as e:
        import traceback

        # A collective fails at once when a peer's connection drops (e.g. "Gloo AllGather failed ... Connection reset
        # by peer"); give the watchdog the peer timeout to name the process that died before reporting this error.
        cluster.await_diagnosis()
        traceback.print_exc()
        cluster.abort(f"{type(e).__name__}: {e}", 1)
    cluster.finish()
    return code


def _job(args, cluster: distributed.Cluster) -> int:
    import dspark_jax as dj
    from dspark_jax import assets
    from dspark_jax.errors import ConfigError, InputError
    from dspark_jax.tools import batch

    if cluster.multi_process:
        # every process must feed the compiled rounds the same scheduler cost model: the deterministic
        # compiled-program one, not a profile stored on one host (engine/schedule.py, schedule_costs)
        os.environ["DSPARK_JAX_PROFILE"] = "model"
    input_path = Path(args.input)
    if not input_path.is_file():
        raise InputError(f"--input {input_path} is not a file; pass a JSONL file of prompts")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    mesh_shape = distributed.parse_mesh(args.mesh)
    target_dir = resolve_checkpoint(args.target, "--target") if args.target is not None else assets.TARGET
    draft_dir = draft_choice(args)
    no_draft = draft_dir is None
    for flag, directory, given in (("--target", target_dir, args.target), ("--draft", draft_dir, args.draft)):
        if isinstance(directory, Path) and not directory.is_dir():
            if given is None:
                raise InputError(f"the built-in checkpoint {directory} (default of {flag}) is not installed; "
                                 f"pass {flag} DIR with a checkpoint directory")
            raise InputError(f"{flag} {directory} is not a directory; pass {flag} DIR with a checkpoint directory")
    settings = batch.Settings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        confidence_threshold=args.confidence_threshold,
        draft_length=None if no_draft else args.draft_length,
        chat=not args.no_chat,
        batching=args.batching,
        schedule=args.schedule,
        sampler=args.sampler,
    )
    for name in batch.LINE_SETTINGS:  # the flags obey the same rules as per-line values
        try:
            batch.check_setting(name, getattr(settings, name))
        except ValueError as e:
            raise InputError(f"--{name.replace('_', '-')}: {e}") from None

    # Cheap checks first: a refused resume or a --strict failure should not wait for the weights to load.
    inputs = batch.read_prompts(input_path)
    if cluster.is_writer:
        batch.report_bad(inputs.bad, args.input, strict=args.strict)
    elif args.strict:
        batch.report_bad(inputs.bad, args.input, strict=True, log=lambda msg: None)
    if not inputs.prompts:
        raise InputError(f"{args.input} has no valid prompt lines")
    dtype = resolve_dtype(args.dtype)
    mesh = distributed.build_mesh(mesh_shape, multi_process=cluster.multi_process)
    job = batch.fingerprint(inputs, target_dir, draft_dir, dtype, settings, batch_size=args.batch_size,
                            mesh=None if mesh is None else (mesh.shape["data"], mesh.shape["model"]))
    with open_answers(args.output, job, inputs, cluster) as answers:
        if answers.truncated_bytes:
            print(f"{args.output}: dropped a partial last line ({answers.truncated_bytes} bytes) of an interrupted run",
                  file=sys.stderr)
        target = draft = None  # not loaded when every prompt is already answered
        if batch.pending_prompts(inputs.prompts, answers):
            target = dj.load_target(target_dir, dtype=dtype, mesh=mesh)
            draft = make_draft(draft_dir, dtype, mesh=mesh)
            if settings.chat and not target.tokenizer.chat_template:
                raise ConfigError(f"{target_dir} has no chat template; pass --no-chat to feed the prompts as raw text")
        summary = batch.run(
            target, draft, inputs.prompts, answers, settings, batch_size=args.batch_size,
            progress=not args.no_progress and cluster.is_writer,
            on_bad=lambda late: batch.report_bad(late, args.input, strict=args.strict,
                                                 log=None if cluster.is_writer else lambda msg: None),
        )
    summary.skipped = inputs.bad + summary.skipped
    if cluster.is_writer:
        print(summary.text(args.input, speculative=draft_dir is not None))
    else:
        print(f"process {cluster.process_id} of {cluster.num_processes}: done; process 0 wrote {args.output}",
              file=sys.stderr)
    return 0


def open_answers(output, job: dict, inputs, cluster: distributed.Cluster):
    """The output for this process: the file itself on process 0 (the only writer); elsewhere the ids process 0
    found answered in it, received from process 0 with its fingerprint, which must equal this process's."""
    import json

    from dspark_jax.errors import InputError
    from dspark_jax.tools import batch

    if not cluster.multi_process:
        return batch.AnswerFile.open(output, job)
    if cluster.is_writer:
        try:
            answers = batch.AnswerFile.open(output, job)
        except InputError as e:
            cluster.publish("start", json.dumps({"error": str(e)}))
            raise
        done = [batch.id_key(p.id) in answers.answered for p in inputs.prompts]
        cluster.publish("start", json.dumps({"job": job, "answered": distributed.encode_mask(done)}))
        return answers
    start = json.loads(cluster.receive("start", timeout_s=24 * 3600))  # the watchdog bounds the wait
    if "error" in start:
        raise InputError(f"process 0 refused the job: {start['error']}")
    if start["job"] != job:
        differences = [f"{k}: {start['job'].get(k)!r} on process 0, {job.get(k)!r} here"
                       for k in sorted(set(start["job"]) | set(job)) if start["job"].get(k) != job.get(k)]
        raise InputError(f"this process runs a different job than process 0 ({'; '.join(differences)}); start every "
                         "process with the same command and the same input and checkpoint files")
    done = distributed.decode_mask(start["answered"])
    return batch.PeerAnswers({batch.id_key(p.id) for p, d in zip(inputs.prompts, done, strict=True) if d})
