"""A Flower Grid whose nodes are the fleet's simulated devices.

Any Flower strategy drives the fleet unchanged: ``send_and_receive`` gets a whole round's messages at once,
turns each into a ``Job`` (device_runtime.protocol), groups them by program and hands them to the host pool,
which answers with ``JobResult``s; each becomes the reply Message. Availability (offline periods,
drop-outs), straggler deadlines and injected faults are simulation and are applied here, per device, from
(seed, round) — so a resumed run draws exactly what an uninterrupted one would.
"""
from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from device_runtime.protocol import CAUSE_DROPOUT, CAUSE_OFFLINE, CAUSE_STRAGGLER, Job, JobResult
from fleet.messages import (instruction, instruction_arrays, instruction_record, job_from_message,
                            modelled_seconds, record_from_reply, record_from_result, reply_from_result)
from fleet.roundlog import DeviceRecord

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
    target: str = ""
    runtime: str = "numpy"
    budget_bytes: int = 0

    def facts(self) -> dict[str, Any]:
        """What the round log records about the device besides its answers."""
        return {"group": self.group, "target": self.target, "runtime": self.runtime,
                "budget_bytes": self.budget_bytes, "modelled_cycles_per_step": self.cycles_per_step,
                "peak_bytes_by_level": dict(self.peak_bytes_by_level)}


@dataclass(frozen=True)
class JobDefaults:
    """What a job gets when the strategy's config does not say otherwise."""
    steps: int
    lr: float
    seed: int
    evaluate_after: bool = True  # train jobs evaluate the trained arrays (scenario training.evaluate_after)


Dispatch = Callable[[str, Sequence[Job]], Iterable[tuple[int, list[JobResult]]]]


class FleetGrid(Grid):
    def __init__(self, devices: Sequence[DeviceInfo], dispatch: Dispatch, defaults: JobDefaults, run_id: int = 1,
                 ahead: bool = True):
        """``dispatch(program_key, jobs)`` runs jobs on the host pool and yields their JobResults in chunks as
        they complete: (offset of the chunk in ``jobs``, its results) (``HostPool.stream``). ``ahead``: the
        driver may submit a round's train messages while it still collects the previous round's replies (not
        with boards: their jobs run when submitted, one board job at a time)."""
        self.ahead = ahead
        self.devices = {NODE_BASE + d.index: d for d in devices}
        self.by_index = {d.index: d for d in devices}
        self.dispatch = dispatch
        self.defaults = defaults
        self.round = 0
        self._run = Run.create_empty(run_id)
        self._replies: dict[str, Message] = {}
        self._records: dict[str, DeviceRecord] = {}  # instruction id → the record of its reply
        self._ids, self._count = uuid.uuid4().hex, itertools.count()  # message ids: this grid's prefix, a number

    # ---- what the round driver asks of any grid ------------------------------------------------------
    def device_of(self, node_id: int) -> int:
        return node_id - NODE_BASE

    def describe(self, index: int) -> Mapping[str, Any]:
        info = self.by_index.get(index)
        return info.facts() if info is not None else {}

    def begin_round(self, round_: int) -> None:
        self.round = round_

    def record(self, reply: Message, round_: int, kind: str) -> DeviceRecord:
        """The round log's record of a reply: made from the device's JobResult when this grid built the reply
        (as each host chunk arrived, while the hosts computed the rest), else read from the reply."""
        record = self._records.pop(reply.metadata.reply_to_message_id, None)
        if record is None or record.round != round_ or record.instruction != kind:
            return record_from_reply(reply, round_, kind, self.device_of, self.describe)
        return record

    # ---- Grid ABC -------------------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def online(self, info: DeviceInfo, round_: int | None = None) -> bool:
        """Whether the device is online in round ``round_`` (default: the current round)."""
        if info.periodic is None:
            return True
        on, off, phase = info.periodic
        return ((self.round if round_ is None else round_) - 1 + phase) % (on + off) < on

    def get_node_ids(self) -> Iterable[int]:
        """The devices online this round (periodic availability); drop-outs are decided per message. When no
        device is online every node is listed (and each answers "offline"), so Flower never waits forever."""
        online = [node_id for node_id, info in self.devices.items() if self.online(info)]
        return online or list(self.devices)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for reply in self.submit(messages, self.round).replies():
            self._replies[reply.metadata.reply_to_message_id] = reply
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    # ---- execution ------------------------------------------------------------------------------------
    def submit(self, messages: Sequence[Message], round_: int) -> "Submission":
        """Turn ``messages`` (of round ``round_``) into jobs and hand them to the hosts now; the replies come from
        ``replies()`` of what this returns, built chunk by chunk as the hosts finish (so a caller can submit
        the next messages first and keep the hosts busy while it handles these)."""
        messages = list(messages)
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"{self._ids}-{next(self._count)}"  # unique in this grid
        if not messages:
            return Submission(lambda: [])
        kind = instruction(messages[0])
        unanswered, streams = self._start(messages, round_)
        return Submission(lambda: self._finish(kind, round_, unanswered, streams))

    def _rng(self, salt: str, round_: int) -> np.random.Generator:
        return np.random.default_rng([self.defaults.seed, round_,
                                      int.from_bytes(salt.encode()[:8].ljust(8, b"\0"), "little")])

    def _start(self, messages: list[Message], round_: int) -> tuple[list[Message], list[tuple[list, Any]]]:
        """Jobs for ``messages`` handed to the hosts: (the replies of devices that do not answer this round,
        [(each program's (message, job, modelled seconds) items, the stream of its results)])."""
        kind = instruction(messages[0])
        decoded: dict[int, dict[str, np.ndarray]] = {}   # id(record) → arrays: shared records decode once
        down_bytes: dict[int, int] = {}
        groups: dict[str, list[tuple[Message, Job, float]]] = {}
        unanswered: list[Message] = []
        draws = self._rng(kind, round_).random((len(messages), 2))
        for (drop_u, fault_u), message in zip(draws, messages):
            info = self.devices[message.metadata.dst_node_id]
            record = instruction_record(message)
            key = id(record)
            if key not in decoded:
                decoded[key] = instruction_arrays(message)
                down_bytes[key] = sum(a.nbytes for a in decoded[key].values())
            arrays, down = decoded[key], down_bytes[key]
            job = job_from_message(message, info.index, arrays, steps=self.defaults.steps, lr=self.defaults.lr,
                                   seed=self.defaults.seed, round=round_, deadline_s=info.deadline_s,
                                   evaluate_after=self.defaults.evaluate_after,
                                   fault=info.fault if (kind == "train" and fault_u < info.fault_p) else "")
            modelled_s = modelled_seconds(kind, cycles_per_step=info.cycles_per_step, steps=job.steps,
                                          clock_hz=info.clock_hz, link_bps=info.link_bps, down_bytes=down)
            failure = self._unavailable(info, kind, drop_u, modelled_s, round_)
            if failure:
                unanswered.append(self._answer(kind, message, JobResult.failed(job, *failure), round_))
                continue
            groups.setdefault(info.program, []).append((message, job, modelled_s))
        for items in groups.values():
            items.sort(key=lambda item: item[1].device)  # stable device → host chunks across rounds
        # every program's jobs are submitted before any reply is built
        return unanswered, [(items, self.dispatch(program, [job for _, job, _ in items]))
                            for program, items in groups.items()]

    def _finish(self, kind: str, round_: int, unanswered: list[Message],
                streams: list[tuple[list, Any]]) -> list[Message]:
        """The replies: each chunk's built while the hosts compute the others; the devices' order kept."""
        replies = list(unanswered)
        for items, stream in streams:
            slots: list[Message | None] = [None] * len(items)
            for offset, results in stream:
                for k, result in enumerate(results, start=offset):
                    slots[k] = self._reply(kind, *items[k], result, round_)
            replies += slots
        return replies

    def _reply(self, kind: str, message: Message, job: Job, modelled_s: float, result: JobResult,
               round_: int) -> Message:
        info = self.devices[message.metadata.dst_node_id]
        if result.ok:
            compute_s = job.steps * info.cycles_per_step / info.clock_hz if kind == "train" else 0.0
            result = result.with_telemetry(modelled_s=compute_s,
                                           link_s=result.telemetry.link_s or max(0.0, modelled_s - compute_s))
        return self._answer(kind, message, result, round_)

    def _answer(self, kind: str, message: Message, result: JobResult, round_: int) -> Message:
        """The reply to ``message``, and its record (``record``)."""
        self._records[message.metadata.message_id] = record_from_result(result, round_, kind, self.describe)
        return reply_from_result(message, result)

    def _unavailable(self, info: DeviceInfo, kind: str, drop_u: float, modelled_s: float,
                     round_: int) -> tuple[str, str] | None:
        """(cause, reason) when the device does not answer this message in simulation, else None."""
        if not self.online(info, round_):
            return CAUSE_OFFLINE, "offline"
        if kind == "train" and drop_u < info.dropout_p:
            return CAUSE_DROPOUT, "dropped out"
        if kind == "train" and info.deadline_s is not None and modelled_s > info.deadline_s:
            return CAUSE_STRAGGLER, f"straggler: {modelled_s:.2f} s > deadline {info.deadline_s:g} s"
        return None


class Submission:
    """Messages whose jobs the hosts have; ``replies()`` (once) waits for and builds their replies."""

    def __init__(self, finish: Callable[[], list[Message]]):
        self._finish: Callable[[], list[Message]] | None = finish

    def replies(self) -> list[Message]:
        if self._finish is None:
            raise RuntimeError("the replies of a submission are collected once")
        finish, self._finish = self._finish, None
        return finish()
