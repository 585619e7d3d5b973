"""Multi-process jobs: the `--coordinator-address/--num-processes/--process-id/--distributed/--mesh` flags, the
JAX multi-controller runtime behind them, and a watchdog that turns a dead process into a clear error.

Every process of a job runs the same command. `start` connects them (`jax.distributed.initialize`, one process
per host, one global mesh over all their devices); from then on they run the same compiled programs in lockstep,
each on its own devices' shards. A collective waits for every process, so one process that dies would leave the
others waiting inside it: each process therefore beats a heartbeat into the coordination service's key-value
store from a thread, and watches everyone else's. A peer whose beat stops for `--peer-timeout` seconds, a peer
that reports an error, or a coordination service that stops answering ends this process with a message on
stderr and `EXIT_PEER_LOST` (JAX's own heartbeat, set to fire later, is the backstop). When the coordinator
(process 0) itself dies, JAX's runtime may end the survivors first, with its own message, also non-zero.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import sys
import threading
import time

from dspark_jax.errors import InputError

EXIT_PEER_LOST = 3
PREFIX = "dspark-jax/"
DEFAULT_PEER_TIMEOUT = 60.0


def add_arguments(parser) -> None:
    group = parser.add_argument_group("multi-process (several hosts, or several processes on one host)")
    group.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                       help="address of process 0, which every process of the job can reach (as jax.distributed.initialize)")
    group.add_argument("--num-processes", type=int, default=None, help="processes in the job (one per host)")
    group.add_argument("--process-id", type=int, default=None, help="this process's index, 0 .. num-processes - 1")
    group.add_argument("--distributed", action="store_true",
                       help="start the multi-process runtime with JAX's auto-detection (TPU pods, SLURM, Open MPI); "
                            "the three flags above, when given, override what it detects")
    group.add_argument("--mesh", default=None, metavar="data=D,model=M",
                       help="device mesh over all processes' devices: requests split over data, the model sharded over "
                            "model (D x M = all devices). Default: data over every device when multi-process, "
                            "one device otherwise")
    group.add_argument("--peer-timeout", type=float, default=DEFAULT_PEER_TIMEOUT,
                       help="seconds without a heartbeat after which another process counts as dead and this one stops")


def parse_mesh(text: str | None) -> tuple[int, int] | None:
    """`data=D,model=M` (either may be left out: 1) -> (D, M); None -> None."""
    if text is None:
        return None
    sizes = {"data": 1, "model": 1}
    seen = set()
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(data|model)\s*=\s*(\d+)\s*", part)
        if m is None or m.group(1) in seen or int(m.group(2)) < 1:
            raise InputError(f"--mesh {text!r} is not understood; write it as data=D,model=M with positive integers "
                             "(e.g. --mesh data=2,model=4)")
        seen.add(m.group(1))
        sizes[m.group(1)] = int(m.group(2))
    return sizes["data"], sizes["model"]


def build_mesh(shape: tuple[int, int] | None, *, multi_process: bool):
    """The job's mesh: `shape` over all devices of all processes, ordered process by process, so a model axis no
    larger than one host's devices stays inside each host. None for one process without `--mesh`."""
    import jax

    from dspark_jax.sharding import make_mesh

    if shape is None:
        return make_mesh(jax.device_count(), 1) if multi_process else None
    data, model = shape
    if data * model != jax.device_count():
        raise InputError(
            f"--mesh data={data},model={model} needs {data * model} devices; the job has {jax.device_count()} "
            f"({jax.process_count()} process(es) x {jax.local_device_count()}). Make data x model equal the device count"
        )
    return make_mesh(data, model)


def _check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--coordinator-address {address!r} must be HOST:PORT (e.g. 10.0.0.1:8476)")


@dataclasses.dataclass
class Cluster:
    """This process's place in the job. One process without flags: `process_id` 0 of 1, no runtime."""

    process_id: int = 0
    num_processes: int = 1
    peer_timeout: float = DEFAULT_PEER_TIMEOUT
    address: str | None = None
    _client: object = None
    _watchdog: threading.Thread | None = None
    _stop: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def multi_process(self) -> bool:
        return self._client is not None

    @property
    def is_writer(self) -> bool:
        """Process 0 writes the job's files; the others compute their shards only."""
        return self.process_id == 0

    # ------------------------------------------------------------------ messages between processes

    def publish(self, name: str, value: str) -> None:
        self._client.key_value_set(PREFIX + name, value, allow_overwrite=True)

    def receive(self, name: str, timeout_s: float) -> str:
        return self._client.blocking_key_value_get(PREFIX + name, int(timeout_s * 1000))

    def report_failure(self, message: str) -> None:
        """Tell the other processes why this one stops, so they stop at once instead of at the peer timeout."""
        if self.multi_process:
            try:
                self.publish(f"failed/{self.process_id}", message)
            except Exception:  # the coordination service may be gone already
                pass

    def barrier(self, name: str, timeout_s: float) -> None:
        self._client.wait_at_barrier(PREFIX + name, int(timeout_s * 1000))

    # ------------------------------------------------------------------ watchdog

    def _watch(self) -> None:
        n, me = self.num_processes, self.process_id
        interval = min(1.0, max(0.1, self.peer_timeout / 10))
        last_value: dict[int, str | None] = dict.fromkeys(range(n))
        last_change = dict.fromkeys(range(n), time.monotonic())
        unreachable_since = None
        beat = 0
        while not self._stop.wait(interval):
            now = time.monotonic()
            try:
                beat += 1
                self.publish(f"beat/{me}", str(beat))
                failed = self._client.key_value_dir_get(PREFIX + "failed/")
                for peer in range(n):
                    if peer == me:
                        continue
                    try:
                        value = self._client.key_value_try_get(PREFIX + f"beat/{peer}")
                    except Exception:  # not beating yet
                        value = None
                    if value != last_value[peer]:
                        last_value[peer], last_change[peer] = value, now
                unreachable_since = None
            except Exception as e:
                unreachable_since = unreachable_since or now
                if now - unreachable_since > self.peer_timeout:
                    self._die(f"lost the coordination service at {self.address} for {self.peer_timeout:.0f} s ({e}); "
                              "process 0, which hosts it, probably died")
                continue
            if failed:
                key, message = sorted(failed)[0]
                peer = key.rsplit("/", 1)[-1]
                if self._stop.is_set():
                    return
                self._die(f"process {peer} of {n} failed: {message}")
            for peer in range(n):
                if peer != me and now - last_change[peer] > self.peer_timeout:
                    if self._stop.is_set():
                        return
                    self._die(f"process {peer} of {n} stopped responding (no heartbeat for {self.peer_timeout:.0f} s): "
                              "it died, was killed or hangs")

    def _die(self, reason: str) -> None:
        sys.stderr.write(
            f"error: {reason}. This process ({self.process_id} of {self.num_processes}) stops too; whatever the job "
            "completed is kept. Rerun the same command on every process to resume it.\n"
        )
        sys.stderr.flush()
        os._exit(EXIT_PEER_LOST)

    def finish(self, timeout_s: float = 600.0) -> None:
        """Wait for every process, stop the watchdog and leave the runtime (a normal end of the job)."""
        if not self.multi_process:
            return
        import jax

        self.barrier("finished", timeout_s)
        self._stop.set()
        self._watchdog.join()
        jax.distributed.shutdown()

    def await_diagnosis(self) -> None:
        """After an unexpected error: wait (at most the peer timeout and a little) for the watchdog to find a dead
        peer, in which case it ends this process with that diagnosis."""
        if self.multi_process and self._watchdog is not None and self._watchdog.is_alive():
            self._watchdog.join(self.peer_timeout + 3.0)

    def abort(self, message: str, code: int) -> None:
        """End this process after an error: tell the others, flush, exit without JAX's shutdown barrier (which
        would wait for processes that are still inside a collective)."""
        self.report_failure(message)
        self._stop.set()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def requested(args) -> bool:
    return bool(args.distributed) or any(
        getattr(args, name) is not None for name in ("coordinator_address", "num_processes", "process_id"))


def start(args) -> Cluster:
    """Check the multi-process flags and, when asked for, join the job's runtime. Call before anything uses JAX."""
    timeout = float(args.peer_timeout)
    if not timeout > 0:
        raise InputError(f"--peer-timeout must be a positive number of seconds, got {args.peer_timeout}")
    if not requested(args):
        return Cluster(peer_timeout=timeout)
    explicit = {"--coordinator-address": args.coordinator_address, "--num-processes": args.num_processes,
                "--process-id": args.process_id}
    if not args.distributed:
        missing = [flag for flag, value in explicit.items() if value is None]
        if missing:
            raise InputError(f"{', '.join(missing)} missing: a multi-process job needs --coordinator-address, "
                             "--num-processes and --process-id on every process, or --distributed for auto-detection")
    if args.coordinator_address is not None:
        _check_address(args.coordinator_address)
    if args.num_processes is not None and args.num_processes < 1:
        raise InputError(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.process_id is not None and (args.process_id < 0 or
                                        (args.num_processes is not None and args.process_id >= args.num_processes)):
        raise InputError(f"--process-id must be in 0 .. --num-processes - 1, got {args.process_id}")
    import jax
    from jax._src import distributed as jax_distributed

    # CPU processes exchange collectives over gloo; accelerators use their own transport (the setting is unused there)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=args.coordinator_address, num_processes=args.num_processes,
            process_id=args.process_id, heartbeat_timeout_seconds=int(2 * timeout + 10),
            initialization_timeout=int(max(300, timeout)),
        )
    except (RuntimeError, ValueError) as e:
        if args.distributed and args.coordinator_address is None:
            raise InputError(f"--distributed found no cluster to join ({e}): JAX detects TPU pods, SLURM, Open MPI "
                             "and Kubernetes jobs; elsewhere pass --coordinator-address, --num-processes and "
                             "--process-id") from e
        raise InputError(f"cannot start the multi-process runtime ({e}); check --coordinator-address and that every "
                         "process was started with the same --num-processes") from e
    cluster = Cluster(process_id=jax.process_index(), num_processes=jax.process_count(), peer_timeout=timeout,
                      address=args.coordinator_address, _client=jax_distributed.global_state.client)
    if cluster.num_processes > 1:
        cluster._watchdog = threading.Thread(target=cluster._watch, name="dspark-jax peer watchdog", daemon=True)
        cluster._watchdog.start()
    else:  # a one-process "cluster" (e.g. --distributed on a single host): nothing to watch
        cluster._watchdog = threading.Thread(target=lambda: None)
        cluster._watchdog.start()
    return cluster


def encode_mask(bits: list[bool]) -> str:
    """A list of booleans as compact text (one bit each) for the key-value store."""
    out = bytearray((len(bits) + 7) // 8)
    for i, b in enumerate(bits):
        if b:
            out[i // 8] |= 1 << (i % 8)
    return json.dumps({"n": len(bits), "bits": base64.b64encode(bytes(out)).decode()})


def decode_mask(text: str) -> list[bool]:
    obj = json.loads(text)
    raw = base64.b64decode(obj["bits"])
    return [bool(raw[i // 8] >> (i % 8) & 1) for i in range(obj["n"])]
