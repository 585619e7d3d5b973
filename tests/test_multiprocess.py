"""`dspark-jax batch` over several processes: 2 local processes x 2 forced CPU devices (gloo collectives), one
global mesh data=2 x model=2, on the built-in target (plain AR keeps the compiles short; all runs share one
persistent compilation cache).

What must hold: the job writes one output file equal, byte for byte, to a one-process run of the same job;
SIGKILLing both processes mid-job and restarting answers every prompt exactly once with the same bytes; killing
one process makes the other exit non-zero with a clear message within a bounded time. Flag errors are checked
in-process, before anything loads.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

PROMPTS = [
    {"prompt": f"Question {i}: what is {i} plus {3 * i}?", **({"temperature": 1.1, "id": f"q{i}"} if i % 5 == 0 else {})}
    for i in range(48)
]
COMMON = ["--draft", "none", "--max-new-tokens", "12", "--temperature", "0.7", "--seed", "3", "--dtype", "float32",
          "--batch-size", "2", "--no-progress"]
# continuous batching writes a window of 8 x --batch-size prompts at a time: 48 prompts make three windows of 16,
# so a kill after the first window lands mid-job
PEER_TIMEOUT = 15  # seconds; short for the test, long enough for a starved heartbeat thread on a busy machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return root


def environment(work: Path, devices: int) -> dict:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_COMPILATION_CACHE_DIR=str(work / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYTHONUNBUFFERED="1",
    )
    return env


def command(work: Path, output: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "dspark_jax.tools.cli", "batch", "--input", str(work / "prompts.jsonl"),
            "--output", str(output), *COMMON, *extra]


def start_job(work: Path, output: Path, log_name: str) -> list[subprocess.Popen]:
    """Both processes of a 2-process job, each with 2 CPU devices; logs in work/<log_name>.<process>.log."""
    port = free_port()
    procs = []
    for pid in (0, 1):
        log = open(work / f"{log_name}.{pid}.log", "w")
        cmd = command(work, output, "--mesh", "data=2,model=2", "--coordinator-address", f"127.0.0.1:{port}",
                      "--num-processes", "2", "--process-id", str(pid), "--peer-timeout", str(PEER_TIMEOUT))
        procs.append(subprocess.Popen(cmd, env=environment(work, 2), stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return procs


def wait_all(procs, timeout=400) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    q.kill()
            raise
    return codes


def log_text(work: Path, log_name: str, pid: int) -> str:
    return (work / f"{log_name}.{pid}.log").read_text(errors="replace")


def run_job(work: Path, output: Path, log_name: str) -> None:
    codes = wait_all(start_job(work, output, log_name))
    assert codes == [0, 0], f"exit codes {codes}\n{log_text(work, log_name, 0)}\n---\n{log_text(work, log_name, 1)}"


def lines_of(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    records = [json.loads(line) for line in data.decode().splitlines()]
    ids = [json.dumps(r["id"]) for r in records]
    assert len(ids) == len(set(ids)), f"an id is answered twice: {sorted(ids)}"
    return records


def expected_ids() -> set[str]:
    return {json.dumps(p.get("id", i)) for i, p in enumerate(PROMPTS)}


@pytest.fixture(scope="module")
def reference(work):
    """The same job in one process on one device (no mesh)."""
    out = work / "reference.jsonl"
    proc = subprocess.run(command(work, out), env=environment(work, 1), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr
    assert {json.dumps(r["id"]) for r in lines_of(out)} == expected_ids()
    return out


def test_two_processes_write_one_file_equal_to_a_one_process_run(work, reference):
    out = work / "two_processes.jsonl"
    run_job(work, out, "two")
    assert {json.dumps(r["id"]) for r in lines_of(out)} == expected_ids()
    assert out.read_bytes() == reference.read_bytes()
    assert f"{len(PROMPTS)} answered now, 0 already answered" in log_text(work, "two", 0)
    assert "process 1 of 2: done" in log_text(work, "two", 1)
    assert not (work / "two_processes.jsonl.1").exists() and len(list(work.glob("two_processes.jsonl*"))) == 2  # + sidecar


def test_one_process_mesh_equals_no_mesh(work, reference):
    """`--mesh` works in one process too: 4 local devices as data=2 x model=2."""
    out = work / "one_process_mesh.jsonl"
    proc = subprocess.run(command(work, out, "--mesh", "data=2,model=2"), env=environment(work, 4),
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == reference.read_bytes()


def wait_for_lines(procs, out: Path, n: int, timeout=300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= n:
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.01)
    for p in procs:
        if p.poll() is None:
            p.kill()
    pytest.fail(f"the job wrote fewer than {n} lines before it ended or timed out")


def test_both_processes_killed_then_restarted_answer_every_prompt_once(work, reference):
    out = work / "killed_both.jsonl"
    procs = start_job(work, out, "killed_both")
    wait_for_lines(procs, out, 1)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    assert [p.wait(timeout=60) for p in procs] == [-signal.SIGKILL] * 2
    written = out.read_bytes()
    complete = written[: written.rfind(b"\n") + 1]
    done_before = complete.count(b"\n")
    assert 1 <= done_before < len(PROMPTS), "the job finished before it could be killed"
    assert reference.read_bytes().startswith(complete)
    run_job(work, out, "killed_both_resumed")
    assert f"{len(PROMPTS) - done_before} answered now, {done_before} already answered" in log_text(work, "killed_both_resumed", 0)
    assert out.read_bytes() == reference.read_bytes()


@pytest.mark.slow
def test_a_killed_process_stops_the_other_with_a_clear_error(work, reference):
    """Process 1 is SIGKILLed mid-job: process 0 (inside a collective, waiting for it) must end within the peer
    timeout plus slack, non-zero, saying which process stopped and how to resume. A restart then completes the
    job with every prompt answered once."""
    out = work / "killed_one.jsonl"
    procs = start_job(work, out, "killed_one")
    wait_for_lines(procs, out, 4)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    assert procs[1].wait(timeout=60) == -signal.SIGKILL
    code = procs[0].wait(timeout=PEER_TIMEOUT + 60)
    elapsed = time.monotonic() - killed_at
    text = log_text(work, "killed_one", 0)
    assert code == 3, f"exit code {code}\n{text}"
    assert elapsed < PEER_TIMEOUT + 30, f"the survivor took {elapsed:.0f} s to stop"
    assert "error: process 1 of 2 stopped responding" in text and "Rerun the same command on every process" in text
    done_before = out.read_bytes().count(b"\n")
    assert done_before < len(PROMPTS)
    run_job(work, out, "killed_one_resumed")
    assert out.read_bytes() == reference.read_bytes()


# ------------------------------------------------------------------------------------- flags, in-process


def run_cli(args, capsys):
    from dspark_jax.tools import cli

    rc = cli.main(["batch", *args])
    return rc, capsys.readouterr()


def test_multi_process_flags_are_checked(work, capsys):
    base = ["--input", str(work / "prompts.jsonl"), "--output", str(work / "flags.jsonl"), *COMMON]
    rc, cap = run_cli([*base, "--num-processes", "2", "--process-id", "0"], capsys)
    assert rc == 2 and "--coordinator-address missing" in cap.err and "--distributed" in cap.err
    rc, cap = run_cli([*base, "--coordinator-address", "localhost", "--num-processes", "2", "--process-id", "0"], capsys)
    assert rc == 2 and "--coordinator-address 'localhost' must be HOST:PORT" in cap.err
    rc, cap = run_cli([*base, "--coordinator-address", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"], capsys)
    assert rc == 2 and "--process-id must be in 0 .. --num-processes - 1, got 2" in cap.err
    rc, cap = run_cli([*base, "--mesh", "data=2,modle=2"], capsys)
    assert rc == 2 and "--mesh 'data=2,modle=2' is not understood" in cap.err
    rc, cap = run_cli([*base, "--mesh", "data=3,model=5"], capsys)
    assert rc == 2 and "--mesh data=3,model=5 needs 15 devices; the job has" in cap.err
    rc, cap = run_cli([*base, "--peer-timeout", "0"], capsys)
    assert rc == 2 and "--peer-timeout must be a positive number" in cap.err
    assert not (work / "flags.jsonl").exists()
    # auto-detection outside any cluster: a clear refusal (in a subprocess: it starts JAX's runtime)
    proc = subprocess.run([sys.executable, "-m", "dspark_jax.tools.cli", "batch", *base, "--distributed"],
                          env=environment(work, 1), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--distributed found no cluster to join" in proc.stderr, proc.stderr
    assert not (work / "flags.jsonl").exists()


def test_parse_mesh_and_answer_masks():
    from dspark_jax.tools import distributed

    assert distributed.parse_mesh("data=2,model=4") == (2, 4)
    assert distributed.parse_mesh("model=8") == (1, 8)
    assert distributed.parse_mesh(None) is None
    bits = [i % 3 == 0 or i == 17 for i in range(29)]
    assert distributed.decode_mask(distributed.encode_mask(bits)) == bits


SHARDED_LOAD = r"""
import json, shutil, sys
from pathlib import Path
import jax, numpy as np
from flax import nnx
import dspark_jax as dj
from dspark_jax import assets
from dspark_jax.errors import CheckpointError
from converters.safetensors_io import SafetensorsFile, save_file

assert jax.device_count() == 4
whole = dict(nnx.to_flat_state(dj.load_target(assets.TARGET, dtype="float32").params))
out = {}
for data, model in ((1, 4), (2, 2)):
    mesh = dj.make_mesh(data=data, model=model)
    sharded = dict(nnx.to_flat_state(dj.load_target(assets.TARGET, dtype="float32", mesh=mesh).params))
    equal = all(np.array_equal(np.asarray(sharded[p].get_value()), np.asarray(whole[p].get_value())) for p in whole)
    embed = sharded[("embed_tokens",)].get_value()
    out[f"{data}x{model}"] = {"equal": equal, "embed_shards": sorted({s.data.shape for s in embed.addressable_shards}),
                              "spec": str(embed.sharding.spec)}
# a broken copy: one tensor missing, then one of the wrong shape; the sliced loader names them
work = Path(sys.argv[1])
st = SafetensorsFile(assets.TARGET / "model.safetensors")
tensors = {k: np.array(st.get(k)) for k in st.keys()}
for name, change in (("missing", lambda t: t.pop("model.layers.2.mlp.up_proj.weight")),
                     ("shape", lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"][:-1]))):
    broken = work / name
    shutil.copytree(assets.TARGET, broken)
    copy = dict(tensors)
    change(copy)
    save_file(copy, broken / "model.safetensors")
    try:
        dj.load_target(broken, dtype="float32", mesh=dj.make_mesh(data=1, model=4))
        out[name] = "loaded"
    except CheckpointError as e:
        out[name] = str(e)
print(json.dumps(out))
"""


def test_sharded_loading_gives_each_device_its_block(work):
    """The sliced loader (a mesh, safetensors) builds the same parameters as the whole-tensor loader, each device
    holding only its block, and refuses a checkpoint with a missing or misshapen tensor by name."""
    proc = subprocess.run([sys.executable, "-c", SHARDED_LOAD, str(work)], env=environment(work, 4),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    vocab, hidden = 4096, 256  # the built-in target
    assert out["1x4"] == {"equal": True, "embed_shards": [[vocab // 4, hidden]], "spec": "P('model', None)"}
    assert out["2x2"] == {"equal": True, "embed_shards": [[vocab // 2, hidden]], "spec": "P('model', None)"}
    assert "checkpoint is missing tensor(s) ['model.layers.2.mlp.up_proj.weight']" in out["missing"]
    assert "tensor 'model.norm.weight'" in out["shape"] and "has shape (255,), expected (256,)" in out["shape"]


def test_processes_running_different_jobs_are_stopped(work):
    """Every process must run the same job: one started with another --max-new-tokens refuses, naming the
    difference, and process 0 stops at once with the reason instead of waiting for it."""
    port = free_port()
    procs = []
    for pid, budget in ((0, "12"), (1, "13")):
        cmd = command(work, work / "mismatch.jsonl", "--mesh", "data=2,model=2", "--coordinator-address",
                      f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid), "--peer-timeout", "60")
        cmd[cmd.index("--max-new-tokens") + 1] = budget
        procs.append(subprocess.Popen(cmd, env=environment(work, 2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert procs[1].returncode == 2, outputs[1]
    assert "runs a different job than process 0 (max_new_tokens: 12 on process 0, 13 here)" in outputs[1]
    assert procs[0].returncode == 3, outputs[0]
    assert "error: process 1 of 2 failed: InputError: this process runs a different job" in outputs[0]


@pytest.mark.slow
def test_speculative_job_over_two_processes_equals_one_process(work):
    """The built-in DSpark draft too (its parameters and the speculative state on the global mesh): 8 prompts, one
    batch, two processes x two devices against one process on one device."""
    inp = work / "spec_prompts.jsonl"
    inp.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[:8]))
    spec = ["--draft-length", "4", "--max-new-tokens", "10", "--temperature", "0.7", "--seed", "3", "--dtype",
            "float32", "--batch-size", "8", "--no-progress"]

    def cmd(out, *extra):
        return [sys.executable, "-m", "dspark_jax.tools.cli", "batch", "--input", str(inp), "--output", str(out),
                *spec, *extra]

    one = work / "spec_one.jsonl"
    proc = subprocess.run(cmd(one), env=environment(work, 1), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    port = free_port()
    two = work / "spec_two.jsonl"
    procs = [subprocess.Popen(cmd(two, "--mesh", "data=2,model=2", "--coordinator-address", f"127.0.0.1:{port}",
                                  "--num-processes", "2", "--process-id", str(pid), "--peer-timeout", "60"),
                              env=environment(work, 2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for pid in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "tau: n/a" not in outputs[0]
    assert len(lines_of(two)) == 8 and two.read_bytes() == one.read_bytes()
