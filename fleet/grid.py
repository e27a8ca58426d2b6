"""A Flower Grid whose nodes are the fleet's simulated devices.

Any Flower strategy's ``start()`` drives the fleet unchanged: ``send_and_receive`` gets a whole round's
messages at once, groups them by program, and hands each Ray host actor many devices per call. Availability
(offline periods, drop-outs), straggler deadlines and injected faults are applied here, per device.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fleet.messages import (ERROR_DROPOUT, ERROR_STRAGGLER, METRICS_KEY, device_reply, error_reply,
                            instruction_arrays, instruction_record, job_kind, modelled_seconds)

NODE_BASE = 100  # node id = NODE_BASE + device index (Flower reserves small ids for the SuperLink)


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    group: str
    program: str                 # key of the program this device runs
    clock_hz: float
    link_bps: float
    deadline_s: float | None
    cycles_per_step: int         # modelled on the device's target
    peak_bytes_by_level: tuple[tuple[str, int], ...] = ()  # from the program's memory plan on its target
    dropout_p: float = 0.0
    periodic: tuple[int, int, int] | None = None  # (on_rounds, off_rounds, phase)
    fault: str = ""              # injected fault kind
    fault_p: float = 0.0


@dataclass
class RoundLog:
    """What the grid saw in one round: per-device records and failure counts by cause."""
    round: int
    devices: list[dict[str, Any]] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)


class FleetGrid(Grid):
    def __init__(self, devices: Sequence[DeviceInfo], dispatch: Callable[..., list[dict[str, Any]]],
                 training: Mapping[str, Any], seed: int, run_id: int = 1):
        """``dispatch(program_key, kind, jobs, arrays)`` runs jobs on the host pool and returns result dicts."""
        self.devices = {NODE_BASE + d.index: d for d in devices}
        self.dispatch = dispatch
        self.training = dict(training)
        self.seed = seed
        self.round = 0
        self._run = Run.create_empty(run_id)
        self._replies: dict[str, Message] = {}
        self.logs: list[RoundLog] = []
        self.on_device: Callable[[dict[str, Any]], None] | None = None  # progress callback

    # ---- Grid ABC -------------------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def online(self, info: DeviceInfo) -> bool:
        if info.periodic is None:
            return True
        on, off, phase = info.periodic
        return (self.round - 1 + phase) % (on + off) < on

    def get_node_ids(self) -> Iterable[int]:
        """The devices online this round (periodic availability); drop-outs are decided per message. When no
        device is online every node is listed (and each answers "offline"), so Flower never waits forever."""
        online = [node_id for node_id, info in self.devices.items() if self.online(info)]
        return online or list(self.devices)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's InMemoryGrid does
        for reply in self._execute(messages):
            self._replies[reply.metadata.reply_to_message_id] = reply
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    # ---- execution ------------------------------------------------------------------------------------
    def _rng(self, salt: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.round, int.from_bytes(salt.encode()[:8].ljust(8, b"\0"), "little")])

    def _execute(self, messages: list[Message]) -> list[Message]:
        if not messages:
            return []
        kind = job_kind(messages[0])
        log = self._log()
        rng = self._rng(kind)
        tables: dict[int, str] = {}
        arrays: dict[str, dict[str, np.ndarray]] = {}
        groups: dict[str, list[tuple[Message, dict[str, Any]]]] = {}
        replies: list[Message] = []
        draws = rng.random((len(messages), 2))
        for (drop_u, fault_u), message in zip(draws, messages):
            info = self.devices[message.metadata.dst_node_id]
            record = instruction_record(message)
            if record is not None and id(record) not in tables:
                key = f"a{len(tables)}"
                tables[id(record)] = key
                arrays[key] = instruction_arrays(message)
            if not self.online(info):
                replies.append(self._error(message, ERROR_DROPOUT, "offline"))
                log.failures["offline"] = log.failures.get("offline", 0) + 1
                continue
            if kind == "train" and drop_u < info.dropout_p:
                replies.append(self._error(message, ERROR_DROPOUT, "dropped out"))
                log.failures["dropout"] = log.failures.get("dropout", 0) + 1
                continue
            steps = int(self.training["local_steps"])
            down_bytes = sum(a.nbytes for a in arrays[tables[id(record)]].values()) if record is not None else 0
            modelled_s = modelled_seconds(kind, cycles_per_step=info.cycles_per_step, steps=steps,
                                          clock_hz=info.clock_hz, link_bps=info.link_bps, down_bytes=down_bytes)
            if kind == "train" and info.deadline_s is not None and modelled_s > info.deadline_s:
                replies.append(self._error(message, ERROR_STRAGGLER, f"straggler: {modelled_s:.2f} s > deadline"))
                log.failures["straggler"] = log.failures.get("straggler", 0) + 1
                continue
            fault = info.fault if (kind == "train" and fault_u < info.fault_p) else ""
            job = {"device": info.index, "arrays": tables[id(record)], "steps": steps,
                   "lr": float(self.training["lr"]), "fault": fault}  # FFA-LoRA's "freeze-lora-a": the program compiles A frozen
            groups.setdefault(info.program, []).append((message, {**job, "_modelled_s": modelled_s,
                                                                  "_down": down_bytes}))
        for program, items in groups.items():
            items.sort(key=lambda item: item[1]["device"])  # stable device → host chunks across rounds
            jobs = [{k: v for k, v in job.items() if not k.startswith("_")} for _, job in items]
            results = self.dispatch(program, kind, jobs, arrays)
            for (message, job), result in zip(items, results):
                replies.append(self._reply(message, kind, job, result, log))
        return replies

    def _reply(self, message: Message, kind: str, job: dict[str, Any], result: dict[str, Any],
               log: RoundLog) -> Message:
        info = self.devices[message.metadata.dst_node_id]
        record = {"round": self.round, "kind": kind, "device": info.index, "group": info.group}
        reply = device_reply(message, kind, result, job["_modelled_s"])
        if reply.has_error():
            log.failures["error"] = log.failures.get("error", 0) + 1
            log.devices.append({**record, "error": result["error"]})
            return reply
        metrics = dict(reply.content.metric_records[METRICS_KEY])
        up_bytes = sum(np.asarray(a).nbytes for a in result["arrays"].values()) if kind == "train" else 0
        log.devices.append({**record, **{k.replace("-", "_"): v for k, v in metrics.items()},
                            "bytes_down": int(job["_down"]), "bytes_up": up_bytes,
                            "wall_s": float(result.get("wall_s", 0.0)),
                            "cycles": int(info.cycles_per_step * job["steps"]) if kind == "train" else 0,
                            "peak_bytes_by_level": dict(info.peak_bytes_by_level)})
        if self.on_device is not None:
            self.on_device(log.devices[-1])
        return reply

    def _error(self, message: Message, code: int, reason: str) -> Message:
        return error_reply(message, code, reason)

    def _log(self) -> RoundLog:
        if not self.logs or self.logs[-1].round != self.round:
            self.logs.append(RoundLog(self.round))
        return self.logs[-1]
