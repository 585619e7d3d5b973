"""`dspark-jax batch`: resumable after SIGKILL, malformed lines reported, answers independent of batch size.

Jobs that generate run the real command in a subprocess on a tiny pair built by `tiny_checkpoint` (a
transformers Qwen3 target and a DeepSpec-layout draft); they share a persistent JAX compilation cache so only
the first run of each batch shape pays for compilation. Jobs refused before any model loads run in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from tiny_checkpoint import session_pair

PROMPTS = [
    {"turns": ["Write a python function to add two numbers.", "A second turn that the job ignores."]},
    {"prompt": "def fibonacci(n):", "id": "fib", "temperature": 0.7, "top_p": 0.9},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A trip to Hawaii?"}], "seed": 7},
    {"turns": ["The quick brown fox"], "max_new_tokens": 5, "id": 42},
    {"prompt": "Janet has 16 eggs and sells the rest.", "top_k": 20},
    {"turns": ["Please reason step by step, and put your final answer within a box."]},
    {"prompt": "0123456789 + 42 = ?"},
    {"turns": ["Compose an engaging travel blog post."], "temperature": 1.3},
    {"prompt": "Write a function that returns the perimeter of a square."},
    {"turns": ["Find the volume of a triangular prism."], "seed": 123},
    {"messages": [{"role": "user", "content": "hi, how are you?"}], "id": "greeting"},
    {"prompt": "The lazy dog sleeps."},
]
COMMON = ["--max-new-tokens", "12", "--temperature", "0.9", "--seed", "5", "--dtype", "float32", "--no-progress",
          "--schedule", "fixed"]  # fixed rounds: sampled answers independent of the batch (docs/algorithm.md)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return session_pair(tmp_path_factory)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    return env


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("input") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def batch_command(pair, input_path, output_path, *extra, draft=True):
    target, draft_dir = pair
    return [
        sys.executable, "-m", "dspark_jax.tools.cli", "batch", "--target", str(target),
        "--draft", str(draft_dir) if draft else "none", "--input", str(input_path), "--output", str(output_path),
        *COMMON, *extra,
    ]


def run_in_process(cmd, capsys, expect_rc):
    """For jobs that stop before loading a model: `cli.main` here, no subprocess start-up."""
    from dspark_jax.tools import cli

    assert cmd[1:4] == ["-m", "dspark_jax.tools.cli", "batch"]
    rc = cli.main(cmd[3:])
    captured = capsys.readouterr()
    assert rc == expect_rc, f"rc {rc}\nstdout:\n{captured.out}\nstderr:\n{captured.err}"
    return captured


def run_batch(cmd, env, expect_rc=0):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect_rc, f"rc {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def kill_after_lines(cmd, env, out: Path, lines: int = 2, timeout: float = 240) -> None:
    """Start the batch job `cmd` and SIGKILL it once `out` holds `lines` complete answers; fails if the job
    finished first."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= lines:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed; give it more prompts"


def answers_by_id(path: Path) -> dict:
    data = path.read_bytes()
    assert data.endswith(b"\n"), "the output must end with a complete line"
    records = [json.loads(line) for line in data.decode().splitlines()]
    ids = [json.dumps(r["id"]) for r in records]
    assert len(ids) == len(set(ids)), f"an id is answered twice: {sorted(ids)}"
    return {i: r for i, r in zip(ids, records, strict=True)}


@pytest.fixture(scope="module")
def reference(pair, env, prompts_file, tmp_path_factory):
    """An uninterrupted run with batch size 3."""
    out = tmp_path_factory.mktemp("reference") / "answers.jsonl"
    proc = run_batch(batch_command(pair, prompts_file, out, "--batch-size", "3"), env)
    assert f"{len(PROMPTS)} answered now" in proc.stdout
    return out


def expected_ids():
    return {json.dumps(p.get("id", i)) for i, p in enumerate(PROMPTS)}


def test_reference_answers_every_prompt_once(reference):
    answers = answers_by_id(reference)
    assert set(answers) == expected_ids()
    for record in answers.values():
        assert set(record) == {"id", "text", "tokens", "finish_reason", "acceptance_length", "rounds"}
        assert record["finish_reason"] in ("stop", "length")
        assert 1 <= len(record["tokens"]) <= (5 if record["id"] == 42 else 12)
        assert record["rounds"] >= 1 and record["acceptance_length"] >= 1
    assert len(answers[json.dumps(42)]["tokens"]) <= 5  # per-line max_new_tokens


def test_same_answers_whatever_the_batch_size(pair, env, prompts_file, reference, tmp_path):
    out = tmp_path / "answers.jsonl"
    run_batch(batch_command(pair, prompts_file, out, "--batch-size", "1"), env)
    assert answers_by_id(out) == answers_by_id(reference)
    # Not only the same answers: the same file (lines are written in the same length-sorted order).
    assert out.read_bytes() == reference.read_bytes()


def test_killed_job_resumes_to_the_uninterrupted_answers(pair, env, prompts_file, reference, tmp_path):
    out = tmp_path / "answers.jsonl"
    cmd = batch_command(pair, prompts_file, out, "--batch-size", "1")
    kill_after_lines(cmd, env, out)
    written = out.read_bytes()
    complete = written[: written.rfind(b"\n") + 1]
    done_before = len(complete.splitlines())
    assert 2 <= done_before < len(PROMPTS)
    # What was written before the kill is exactly the start of the uninterrupted answers.
    assert reference.read_bytes().startswith(complete)
    # A machine crash can leave half a line; the restart must drop it.
    with open(out, "ab") as f:
        f.write(b'{"id": "half a line", "te')
    proc = run_batch(cmd, env)
    assert "dropped a partial last line" in proc.stderr
    assert f"{len(PROMPTS) - done_before} answered now, {done_before} already answered" in proc.stdout
    assert out.read_bytes() == reference.read_bytes()
    # A third run has nothing left to do and changes nothing.
    proc = run_batch(cmd, env)
    assert f"0 answered now, {len(PROMPTS)} already answered" in proc.stdout
    assert out.read_bytes() == reference.read_bytes()


def test_resume_with_other_arguments_is_refused(pair, prompts_file, reference, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    out.write_bytes(reference.read_bytes())
    (tmp_path / "answers.jsonl.job.json").write_bytes((reference.parent / "answers.jsonl.job.json").read_bytes())
    cmd = batch_command(pair, prompts_file, out, "--batch-size", "3")
    cmd[cmd.index("--temperature") + 1] = "0.5"
    proc = run_in_process(cmd, capsys, expect_rc=2)
    assert "different arguments" in proc.err and "temperature: 0.9 there, 0.5 now" in proc.err
    assert out.read_bytes() == reference.read_bytes()
    # A file that no batch job wrote is not appended to either.
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"something": "else"}\n')
    proc = run_in_process(batch_command(pair, prompts_file, foreign), capsys, expect_rc=2)
    assert "not written by a dspark-jax batch job" in proc.err
    assert foreign.read_text() == '{"something": "else"}\n'


MALFORMED = [
    '{"prompt": "fine line"}',
    "this is not json",
    "",
    '{"turns": []}',
    '{"prompt": "bad temperature", "temperature": -1}',
    '["a", "list"]',
    '{"prompt": "duplicate id", "id": 0}',
    '{"messages": [{"role": "user", "content": "fine chat line"}]}',
    '{"prompt": "an object id", "id": {"a": 1}}',
]


def test_malformed_lines_are_reported_and_skipped(pair, env, tmp_path):
    inp = tmp_path / "prompts.jsonl"
    inp.write_text("\n".join(MALFORMED) + "\n")
    out = tmp_path / "answers.jsonl"
    proc = run_batch(batch_command(pair, inp, out, "--batch-size", "4", draft=False), env)
    bad_lines = [2, 4, 5, 6, 7, 9]  # 1-based, as printed
    for n in bad_lines:
        assert f"prompts.jsonl:{n}: skipped:" in proc.stderr, proc.stderr
    assert "prompts.jsonl:3:" not in proc.stderr  # a blank line is not a prompt
    assert "repeats the id of line 1" in proc.stderr
    assert f"skipped malformed lines: {len(bad_lines)} (line {', '.join(map(str, bad_lines))})" in proc.stdout
    assert "tau: n/a" in proc.stdout  # plain AR decoding
    answers = answers_by_id(out)
    assert set(answers) == {"0", "7"}  # ids default to 0-based line numbers
    assert all(r["acceptance_length"] == 1.0 for r in answers.values())


def test_strict_fails_on_the_first_malformed_line(pair, tmp_path, capsys):
    inp = tmp_path / "prompts.jsonl"
    inp.write_text("\n".join(MALFORMED) + "\n")
    out = tmp_path / "answers.jsonl"
    proc = run_in_process(batch_command(pair, inp, out, "--strict"), capsys, expect_rc=2)
    assert "prompts.jsonl:2: not valid JSON" in proc.err and "--strict" in proc.err
    assert not out.exists()


def test_a_second_writer_is_refused(tmp_path):
    from dspark_jax.errors import InputError
    from dspark_jax.tools import batch

    job = {"format": batch.FORMAT, "input_sha256": "0"}
    out = tmp_path / "answers.jsonl"
    with batch.AnswerFile.open(out, job) as first:
        with pytest.raises(InputError, match="another dspark-jax batch job is writing"):
            batch.AnswerFile.open(out, job)
        first.append({"id": 0, "text": "a"})
    with batch.AnswerFile.open(out, job) as again:  # the lock went with the first writer
        assert again.answered == {batch.id_key(0)}


def test_batches_are_length_sorted_and_share_one_shape():
    from dspark_jax.tools import batch

    rows = [batch._Row(batch.Prompt(i, i, None, "x", {}), [1] * n, {}) for i, n in enumerate([9, 2, 7, 2, 30, 5, 1])]
    groups = batch.batches(rows, 3)
    assert [len(g) for g in groups] == [3, 3, 3]
    assert [None if r is None else len(r.ids) for g in groups for r in g] == [1, 2, 2, 5, 7, 9, 30, None, None]
    assert [r.prompt.line for r in groups[0]] == [6, 1, 3]  # equal lengths keep input order
    assert [len(g) for g in batch.batches(rows[:2], 16)] == [2]


HOSTILE = [
    b'{"prompt": "a good line"}',
    b'{"prompt": "a lone surrogate \\ud800 in the prompt"}',
    b'{"prompt": 42}',
    b'{"prompt": "a negative budget", "max_new_tokens": -3}',
    b'{"prompt": "truncated JSON',
    b'{"turns": ["an unpaired low surrogate \\udfff in a turn"]}',
    b'{"messages": [{"role": "user", "content": "an unpaired high surrogate \\ud83d"}]}',
    b'{"prompt": "an infinite temperature", "temperature": Infinity}',
    b'{"prompt": "a NaN top_p", "top_p": NaN}',
    b'{"prompt": "invalid UTF-8 \xff\xfe bytes"}',
    b'{"messages": [{"role": "user", "content": ["not", "text"]}]}',
    b'{"prompt": "a surrogate id", "id": "\\ud800"}',
    b'{"prompt": "a boolean top_k", "top_k": true}',
    b'{"prompt": "a seed too large", "seed": 99999999999}',
    b'{"prompt": "a second good line", "id": "two"}',
    b'{"prompt": "a tiny temperature is greedy", "temperature": 1e-37, "id": "tiny"}',
]


def test_hostile_lines_are_skipped_and_the_job_completes(pair, env, tmp_path):
    inp = tmp_path / "prompts.jsonl"
    inp.write_bytes(b"\n".join(HOSTILE) + b"\n")
    out = tmp_path / "answers.jsonl"
    for chat in (True, False):
        proc = run_batch(batch_command(pair, inp, out, "--batch-size", "2", *([] if chat else ["--no-chat"]), draft=False), env)
        bad = [i + 1 for i in range(1, 14)]
        assert f"skipped malformed lines: {len(bad)} (line {', '.join(map(str, bad))})" in proc.stdout, proc.stdout + proc.stderr
        assert "not valid Unicode" in proc.stderr and "max_new_tokens must be" in proc.stderr
        answers = answers_by_id(out)
        assert set(answers) == {"0", '"two"', '"tiny"'}
        assert all(r["tokens"] for r in answers.values())
        out.unlink()
        out.with_name(out.name + ".job.json").unlink()


BF16 = [c if c != "float32" else "bfloat16" for c in COMMON]


def bf16_command(pair, input_path, output_path, batch_size):
    cmd = batch_command(pair, input_path, output_path, "--batch-size", str(batch_size))
    i = cmd.index("--dtype")
    cmd[i + 1] = "bfloat16"
    return cmd


@pytest.mark.slow  # the batch plan it relies on is checked call by call in the default run (below)
def test_bf16_resumed_job_equals_the_uninterrupted_one(pair, env, prompts_file, tmp_path, capsys):
    """In bf16 a row's logits can change with the batch shape (by ~1e-2 on accelerators), so a resume must run every
    prompt in the batch it had in the uninterrupted job: 10 of 12 answered leaves 2, which re-batching would run as
    a batch of 2 instead of 4. (XLA:CPU computes these bf16 matmuls with shape-independent results for this tiny
    model, so here the end-to-end check cannot tell; the batch plan itself is checked call by call in
    `test_every_prompt_runs_in_the_same_batch_whatever_the_resume_point`.)"""
    reference = tmp_path / "reference.jsonl"
    run_batch(bf16_command(pair, prompts_file, reference, 4), env)
    lines = reference.read_bytes().splitlines(keepends=True)
    assert len(lines) == len(PROMPTS)
    sidecar = reference.with_name(reference.name + ".job.json")
    assert json.loads(sidecar.read_text())["batch_size"] == 4
    for done in (10, 5):  # the state a kill leaves: complete lines and the job file
        out = tmp_path / f"resumed_{done}.jsonl"
        out.write_bytes(b"".join(lines[:done]))
        out.with_name(out.name + ".job.json").write_bytes(sidecar.read_bytes())
        proc = run_batch(bf16_command(pair, prompts_file, out, 4), env)
        assert f"{len(PROMPTS) - done} answered now, {done} already answered" in proc.stdout
        assert out.read_bytes() == reference.read_bytes(), f"resumed after {done} answers"
    # another batch size would answer differently in bf16: resuming with it is refused before any model loads
    proc = run_in_process(bf16_command(pair, prompts_file, out, 2), capsys, expect_rc=2)
    assert "batch_size: 4 there, 2 now" in proc.err


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_every_prompt_runs_in_the_same_batch_whatever_the_resume_point(pair, prompts_file, tmp_path, monkeypatch, batching):
    """The batch plan does not depend on what is already answered: from every resume point, each prompt is
    generated in a `generate` call with exactly the arguments (batch mates, order, settings, hence program shapes)
    it had in the uninterrupted job. This is what makes a bf16 resume equal an uninterrupted job, checked here on
    the calls themselves, since on CPU bf16 logits hardly vary with the batch shape. Static batches of `width`
    rows; continuous windows of `WINDOW_SLOTS` x slots prompts (slots chosen so that 12 prompts make 2 windows)."""
    import dspark_jax as dj
    from dspark_jax.engine.generation import GenerationResult
    from dspark_jax.tools import batch

    target = dj.load_target(pair[0], dtype="float32")
    calls = []

    def spy(target_, draft_, prompts, **kwargs):
        calls.append((tuple(map(tuple, prompts)), json.dumps(kwargs, sort_keys=True)))
        mates = sum(len(p) * (i + 1) for i, p in enumerate(prompts))  # like bf16 logits: depends on the whole batch
        tokens = [[int(sum(p)) % 50 + 1, mates % 50 + 1] for p in prompts]
        stats = types.SimpleNamespace(acceptance_lengths=[[1, 1]] * len(prompts), finish_reasons=["length"] * len(prompts),
                                      rounds=[1] * len(prompts))
        return GenerationResult(tokens=tokens, stats=stats)

    monkeypatch.setattr(dj, "generate", spy)
    inputs = batch.read_prompts(prompts_file)
    settings = batch.Settings(max_new_tokens=12, temperature=0.9, seed=5, batching=batching)
    size = 5 if batching == "static" else 1
    per_call = size * (1 if batching == "static" else batch.WINDOW_SLOTS)
    assert per_call == {"static": 5, "continuous": 8}[batching]
    job = batch.fingerprint(inputs, pair[0], None, "bfloat16", settings, batch_size=size)

    def run(out):
        calls.clear()
        with batch.AnswerFile.open(out, job) as answers:
            batch.run(target, None, inputs.prompts, answers, settings, batch_size=size, progress=False)
        return list(calls)

    full_out = tmp_path / "full.jsonl"
    full_calls = run(full_out)
    # static: 12 prompts in batches of 5: 5, 5, 2 + 3 fillers; continuous: windows of 8 and 4
    assert len(full_calls) == {"static": 3, "continuous": 2}[batching]
    reference = full_out.read_bytes()
    lines = reference.splitlines(keepends=True)
    for done in range(1, len(PROMPTS)):
        out = tmp_path / f"resumed_{done}.jsonl"
        out.write_bytes(b"".join(lines[:done]))
        out.with_name(out.name + ".job.json").write_bytes(full_out.with_name(full_out.name + ".job.json").read_bytes())
        resumed_calls = run(out)
        assert resumed_calls == full_calls[done // per_call :], f"resumed after {done}: different batches"
        assert out.read_bytes() == reference, f"resumed after {done}"
