"""Dev boards on serial lines in the fleet: one board-proxy actor per board, and the dispatch that sends a
round's board jobs to them while the simulated devices' jobs go to the host pool.

A board is a device like any other: the round driver and ``FleetGrid`` build its Jobs, the strategy
aggregates its replies, its answers become ``DeviceRecord``s. Only the executor differs:

- ``BoardProxyCore`` owns one port. It opens a ``SerialDevice`` on it once (the hello checks that the board
  holds this program's layout) and keeps it between jobs; each Job runs through ``run_job`` on the board's own
  data partition, generated on the proxy's node from the scenario seed exactly as a host generates a
  simulated device's. The job's link time and bytes (both directions, framing included) go into its
  Telemetry beside the board's measured cycles and instructions. A link failure fails the job with its
  cause (``disconnected``, ``timeout``) and closes the port; the next job opens it again (a fresh hello, the
  whole parameter region compared by CRC-32 and uploaded when it differs), so a board that was reset,
  re-plugged or un-stalled is back in the next round. No parameters are taken from a failed transfer
  (device_runtime.serial.device). With ``qemu = true`` the proxy first starts a QEMU board with the program's
  serial firmware on a pty of its own node (the demo and the tests' stand-in for a board on USB-serial).
- ``BoardProxy`` is the same class as a Ray actor, placed with the board's custom resource
  (``{"board:<name>": 1}`` unless the scenario names another), so it runs on the node the board is plugged
  into. A local Ray started by edgefleet declares every board's resource on this machine; on a cluster the
  lab declares it where the board is: ``ray start --address=HEAD --resources='{"board:b0": 1}'``.
- ``BoardPool`` starts the proxies and runs a round's board jobs on all of them at once; ``Dispatcher``
  routes a program key's jobs to the boards or to the host pool.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

from compiler.program import Program
from device_runtime.device import DeviceError
from device_runtime.jobs import failure_cause, run_job
from device_runtime.protocol import (CAUSE_DISCONNECTED, CAUSE_ERROR, CAUSE_TIMEOUT, Job, JobResult, decode_jobs,
                                     encode_jobs)
from fleet.data import DeviceData, device_data
from fleet.scenario import BoardSpec, DataSpec, DeviceGroup, Scenario

RUNTIME = "serial"                 # DeviceInfo.runtime / DeviceRecord.runtime of a board
RECONNECT_CAUSES = (CAUSE_DISCONNECTED, CAUSE_TIMEOUT)  # the port is closed and opened again at the next job
JOB_MARGIN_S = 600.0               # on top of the link's own deadlines, before a proxy is given up for the round
EVAL_RUNS_PER_JOB = 8              # a bound on the evaluate batches of one job (for the proxy's deadline)


class BoardProxyCore:
    """One board on one port (see the module docstring); the Ray actor ``BoardProxy`` is this class."""

    def __init__(self, spec: Mapping[str, Any], index: int, manifest: bytes, params: bytes,
                 data_spec: Mapping[str, Any], seed: int, firmware: tuple[bytes, bytes] | None = None):
        self.spec = BoardSpec(**spec)
        self.index = index
        self.program = Program.from_bytes(manifest, params, where=f"board {self.spec.name}")
        self.firmware = Program.from_bytes(*firmware, where=f"board {self.spec.name}") if firmware else self.program
        self.data_spec = DataSpec(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data_spec.items()})
        self.seed = seed
        self.qemu = None                   # the QEMU board this proxy started (qemu = true)
        self.device = None                 # the open SerialDevice, or None until the next job opens it
        self.url = self.spec.port
        self.opened = 0                    # how often the port was opened (1 + reconnects)
        self.start_error = ""              # why the QEMU board could not be started (qemu = true)
        self._data: DeviceData | None = None

    # ---- the port ---------------------------------------------------------------------------------------
    def start(self) -> dict[str, Any]:
        """Start the QEMU board (qemu = true) and open the port; what was found (the hello or the error).
        A board that does not answer now is not an error here: its jobs fail until it does."""
        error = ""
        try:
            self._start_qemu()
            self._open()
        except DeviceError as exc:
            error = _line(exc)
        return self.status(error)

    def _start_qemu(self) -> None:
        """qemu = true: build the program's serial firmware and start the QEMU board (once; a failure is kept and
        each job fails with it, cause "error")."""
        if not self.spec.qemu or self.qemu is not None:
            return
        if self.start_error:
            raise DeviceError(self.start_error)
        from device_runtime.serial.qemu_board import QemuBoard, build_serial_firmware
        try:
            self.qemu = QemuBoard(build_serial_firmware(self.firmware))
        except Exception as exc:  # a firmware that does not build is this board's failure, not the run's
            self.start_error = f"cannot start the QEMU board: {_line(exc)}"
            raise DeviceError(self.start_error) from None
        self.url = self.qemu.url

    def status(self, error: str = "") -> dict[str, Any]:
        hello = self.device.hello.to_dict() if self.device is not None else None
        return {"name": self.spec.name, "device": self.index, "url": self.url, "node": _node(),
                "resource": self.spec.ray_resource, "qemu_pid": self.qemu.process.pid if self.qemu else None,
                "hello": hello, "opened": self.opened, "error": error}

    def _open(self) -> None:
        from device_runtime.serial.device import SerialDevice
        if self.url is None:
            raise DeviceError(f"board {self.spec.name}: no port")
        self.device = SerialDevice(self.program, self.url, name=self.spec.name, baud_rate=self.spec.baud,
                                   run_step_timeout_s=self.spec.step_timeout_s)
        self.opened += 1

    def _close_port(self) -> None:
        if self.device is not None:
            self.device.close()
            self.device = None

    # ---- work -------------------------------------------------------------------------------------------
    def data(self, device: int) -> DeviceData:
        if self._data is None:
            self._data = device_data(self.data_spec, self.seed, device)
        return self._data

    def run(self, payload: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Run the jobs of ``payload`` (``encode_jobs``) on the board, in order; one JobResult dict each."""
        return [self._run(job).to_dict() for job in decode_jobs(payload)]

    def _run(self, job: Job) -> JobResult:
        start = time.perf_counter()
        if job.device != self.index:
            return JobResult.failed(job, CAUSE_ERROR, f"board {self.spec.name} is device {self.index}, "
                                                  f"not device {job.device}")
        if self.device is None:
            try:
                self._start_qemu()
                self._open()
            except DeviceError as exc:
                return JobResult.failed(job, failure_cause(exc), f"board {self.spec.name}: {exc}")
        stats = self.device.link.stats
        link_s, link_bytes = stats.link_s, stats.bytes_sent + stats.bytes_received
        result = run_job(self.device, job, self.data(job.device))
        result = result.with_telemetry(link_s=stats.link_s - link_s,
                                       link_bytes=stats.bytes_sent + stats.bytes_received - link_bytes,
                                       wall_s=time.perf_counter() - start)
        if result.cause in RECONNECT_CAUSES:
            self._close_port()
        return result

    def close(self) -> None:
        self._close_port()
        if self.qemu is not None:
            self.qemu.stop()
            self.qemu = None


def _node() -> str:
    try:
        import ray
        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except ImportError:  # pragma: no cover
        pass
    return "local"


try:  # the Ray actor form; it waits on a serial line, so it takes no CPU from the device hosts
    import ray

    BoardProxy = ray.remote(num_cpus=0, max_restarts=0)(BoardProxyCore)
except ImportError:  # pragma: no cover
    BoardProxy = None


# ---- the fleet's side ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Board:
    """A board as the fleet knows it: its scenario entry, device index, program key and program."""
    spec: BoardSpec
    index: int
    key: str
    program: Program
    firmware: Program | None = None    # what the QEMU board runs, when the scenario names a program directory
    rank: int | None = None            # the program's LoRA rank


def plan_boards(scenario: Scenario, builder: Any) -> list[Board]:
    """The scenario's boards with their programs: the fleet's program for the board's target (and rank, chosen
    from ``memory_kib`` as for a group), checked against a flashed program directory when one is named."""
    out = []
    for i, (spec, index) in enumerate(scenario.fleet.board_indices()):
        rank = builder.rank_for(board_group(spec))
        program = builder.program(spec.target, rank)
        key = (f"{spec.target}-r{rank}" if rank else spec.target) + f"-{RUNTIME}"
        out.append(Board(spec, index, key, program, check_flashed_program(spec, f"fleet.boards[{i}]", program), rank))
    return out


def board_group(spec: BoardSpec) -> DeviceGroup:
    """The one-device group a board stands for when its program and rank are chosen."""
    return DeviceGroup(name=spec.name, count=1, target=spec.target, memory_kib=spec.memory_kib)


def board_resources(scenario: Scenario) -> dict[str, float]:
    """The Ray custom resources a local Ray declares for the scenario's boards (all plugged in here)."""
    return {spec.ray_resource: 1.0 for spec in scenario.fleet.boards}


def check_flashed_program(spec: BoardSpec, where: str, program: Program) -> Program | None:
    """The program directory a board was flashed with (``fleet.boards[i].program``), checked to have the fleet
    program's layout, so the fleet's parameters fit the board's region tensor for tensor."""
    if spec.program is None:
        return None
    from compiler.codegen.emit import program_fingerprint
    from fleet.runs import RunError
    try:
        flashed = Program.load(spec.program)
    except Exception as exc:  # unreadable or not a program directory: one line naming key and path
        raise RunError(f"{where}.program: cannot load {spec.program}: {str(exc).splitlines()[0] if str(exc) else exc}")
    if program_fingerprint(flashed) != program_fingerprint(program):
        raise RunError(f"{where}.program: {spec.program} (model {flashed.model!r}, hash "
                       f"{program_fingerprint(flashed):08x}) is not the fleet's program for target {spec.target!r} "
                       f"(hash {program_fingerprint(program):08x}): compile it from this scenario's model and tuning")
    return flashed


class BoardPool:
    """The scenario's board proxies (Ray actors, or in-process for ``actors=0``)."""

    def __init__(self, scenario: Scenario, boards: Sequence[Board], actors: int,
                 log: Callable[[str], None] = print):
        self.scenario = scenario
        self.boards = {b.index: b for b in boards}
        self.keys = frozenset(b.key for b in boards)
        self.use_ray = actors > 0
        self.log = log
        self.proxies: dict[int, Any] = {}
        self.status: dict[int, dict[str, Any]] = {}

    def start(self) -> list[dict[str, Any]]:
        """Start every proxy (their QEMU boards, their ports); what each found. A board's resource that no Ray
        node offers is an error naming the board and how to declare it."""
        if not self.boards:
            return []
        if self.use_ray:
            self._check_resources()
        for index in self.boards:
            self.proxies[index] = self._proxy(self.boards[index])
        found = self._call_all({i: ("start", ()) for i in self.proxies}, timeout_s=JOB_MARGIN_S)
        for index, status in found.items():
            if isinstance(status, BaseException):
                status = {"name": self.boards[index].spec.name, "device": index, "error": _line(status)}
                self.proxies.pop(index, None)
            self.status[index] = status
            if status.get("error"):
                self.log(f"edgefleet: board {status['name']} (device {index}) does not answer yet: {status['error']}")
        return [self.status[i] for i in sorted(self.status)]

    def _check_resources(self) -> None:
        import ray
        from fleet.runs import RunError
        offered = ray.cluster_resources()
        for board in self.boards.values():
            resource = board.spec.ray_resource
            if offered.get(resource, 0) < 1:
                raise RunError(f"board {board.spec.name!r}: no Ray node offers the resource {resource!r}; declare "
                               f"it on the node the board is plugged into: ray start --resources="
                               f"'{{\"{resource}\": 1}}' (docs/boards.md)")

    def _proxy(self, board: Board) -> Any:
        data = self.scenario.data
        args = (_spec_dict(board.spec), board.index, *board.program.to_bytes(),
                {k: getattr(data, k) for k in data.__dataclass_fields__}, self.scenario.seed,
                board.firmware.to_bytes() if board.firmware is not None else None)
        if not self.use_ray:
            return BoardProxyCore(*args)
        return BoardProxy.options(resources={board.spec.ray_resource: 1}).remote(*args)

    def _call_all(self, calls: Mapping[int, tuple[str, tuple]], timeout_s: float | Mapping[int, float]
                  ) -> dict[int, Any]:
        """Call a method on several proxies at once; each one's answer, or the exception it raised."""
        out: dict[int, Any] = {}
        if not self.use_ray:
            for index, (method, args) in calls.items():
                try:
                    out[index] = getattr(self.proxies[index], method)(*args)
                except Exception as exc:  # an in-process proxy failing is that board's failure only
                    out[index] = exc
            return out
        import ray
        refs = {index: getattr(self.proxies[index], method).remote(*args) for index, (method, args) in calls.items()}
        started = time.monotonic()
        for index, ref in refs.items():
            limit = timeout_s[index] if isinstance(timeout_s, Mapping) else timeout_s
            try:
                out[index] = ray.get(ref, timeout=max(1.0, limit - (time.monotonic() - started)))
            except ray.exceptions.GetTimeoutError:
                out[index] = TimeoutError(f"board proxy did not answer within {limit:.0f} s")
                self._drop(index)
            except ray.exceptions.RayTaskError as exc:   # the call raised; the proxy lives on
                out[index] = RuntimeError(f"board proxy: {_line(exc)}")
            except ray.exceptions.RayError as exc:       # the proxy is gone: a new one at the next job
                out[index] = ConnectionError(f"board proxy failed: {_line(exc)}")
                self._drop(index)
        return out

    def _drop(self, index: int) -> None:
        """Give up a proxy that hung or died; the next dispatch starts a new one."""
        import ray
        proxy = self.proxies.pop(index, None)
        if proxy is not None:
            try:
                ray.kill(proxy)
            except Exception:  # already gone
                pass

    def dispatch(self, jobs: Sequence[Job]) -> list[JobResult]:
        """Run each job on its board's proxy, all boards at once; one JobResult per job, in order."""
        by_board: dict[int, list[Job]] = {}
        for job in jobs:
            by_board.setdefault(job.device, []).append(job)
        for index in by_board:
            if index in self.boards and index not in self.proxies:  # given up earlier: a new proxy
                self.proxies[index] = self._proxy(self.boards[index])
                self._call_all({index: ("start", ())}, timeout_s=JOB_MARGIN_S)
        calls = {i: ("run", (encode_jobs(js),)) for i, js in by_board.items() if i in self.proxies}
        limits = {i: sum(_job_limit_s(j, self.boards[i].spec) for j in js) for i, js in by_board.items()}
        answers = self._call_all(calls, limits)
        results: dict[int, list[JobResult]] = {}
        for index, board_jobs in by_board.items():
            answer = answers.get(index, ConnectionError("no board proxy"))
            if isinstance(answer, BaseException):
                cause = (CAUSE_TIMEOUT if isinstance(answer, TimeoutError) else
                         CAUSE_DISCONNECTED if isinstance(answer, ConnectionError) else CAUSE_ERROR)
                name = self.boards[index].spec.name if index in self.boards else index
                results[index] = [JobResult.failed(j, cause, f"board {name}: {_line(answer)}") for j in board_jobs]
            else:
                results[index] = [JobResult.from_dict(r) for r in answer]
        return [results[job.device].pop(0) for job in jobs]

    def report(self) -> list[dict[str, Any]]:
        """Each board's state now (port, node, hello, times the port was opened), for the run's summary."""
        now = self._call_all({i: ("status", ()) for i in self.proxies}, timeout_s=30.0)
        for index, status in now.items():
            if not isinstance(status, BaseException):
                self.status[index] = {**status, "error": self.status.get(index, {}).get("error", "")}
        return [self.status[i] for i in sorted(self.status)]

    def close(self) -> None:
        """Close the ports and stop the QEMU boards the proxies started."""
        if not self.proxies:
            return
        self._call_all({i: ("close", ()) for i in self.proxies}, timeout_s=30.0)
        if self.use_ray:
            for index in list(self.proxies):
                self._drop(index)
        self.proxies.clear()


class Dispatcher:
    """``FleetGrid``'s dispatch: a program key's jobs go to the board proxies when the key is a board's, else
    to the host pool."""

    def __init__(self, hosts: Any, boards: BoardPool):
        self.hosts = hosts
        self.boards = boards

    def dispatch(self, key: str, jobs: Sequence[Job]) -> list[JobResult]:
        if key in self.boards.keys:
            return self.boards.dispatch(jobs)
        return self.hosts.dispatch(key, jobs)

    def stream(self, key: str, jobs: Sequence[Job]) -> Iterator[tuple[int, list[JobResult]]]:
        """(offset, results) chunks as they complete (``HostPool.stream``); a board key's jobs in one."""
        if key in self.boards.keys:
            return iter([(0, self.boards.dispatch(jobs))])
        return self.hosts.stream(key, jobs)


def _job_limit_s(job: Job, spec: BoardSpec) -> float:
    """How long a proxy may take for a job before it is given up: the link's own deadlines come first."""
    from device_runtime.serial.link import MAX_RETRIES
    return JOB_MARGIN_S + (job.steps + EVAL_RUNS_PER_JOB) * spec.step_timeout_s * (1 + MAX_RETRIES)


def _spec_dict(spec: BoardSpec) -> dict[str, Any]:
    return {k: getattr(spec, k) for k in spec.__dataclass_fields__}


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}".rstrip(": ")
