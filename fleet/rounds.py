"""The round driver: one object runs the rounds of any Flower strategy over any Grid, and keeps one record
of each round (``RoundLog``) from its beginning to its end.

It calls the strategy's own hooks — ``configure_train``, ``aggregate_train``, ``configure_evaluate``,
``aggregate_evaluate`` — in the order Flower's ``Strategy.start()`` does, but from any first round, so a
resumed run continues at the server round where it stopped (FedAdam's bias correction, FedProx's and the DP
wrappers' round bookkeeping see the same numbers as in an uninterrupted run). Node sampling (Flower samples
with Python's ``random``) and server-side noise (numpy's global generator) are seeded per round here.

Observers (``fleet.roundlog.RoundObserver``: run directory, metrics exporter, progress display) are told
when a round begins, when each device's answer is in, and when the round ends; ``checkpoint`` receives the
round's aggregated arrays and the strategy's state after the observers.

On a grid that can submit a round's messages and collect their replies later (``FleetGrid.submit``), the
next round's train instructions go out right after this round's evaluate instructions, so the devices (the
hosts) go on computing while the driver collects the evaluation, aggregates it and closes the round (when
the grid says it may: ``ahead``). The strategy's hooks still run in Flower's order, except that
``configure_train`` of round r+1 comes before ``aggregate_evaluate`` of round r — which only strategies
whose evaluation feeds their training could tell, so it is done only for Flower's and edgefleet's own
(``evaluation_feeds_training``); the round's random draws are seeded as before, and the checkpoint holds the
strategy's state as it was before that call.
"""
from __future__ import annotations

import random
import time
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fleet.messages import instruction, record_from_reply
from fleet.roundlog import DeviceRecord, RoundLog, RoundObserver

DEFAULT_TIMEOUT_S = 3600.0


class FleetAwareGrid(Protocol):
    """What the driver asks of a grid besides Flower's Grid API (``FleetGrid`` has it; for Flower's own
    grids ``NodeMap`` stands in)."""

    def device_of(self, node_id: int) -> int: ...

    def describe(self, index: int) -> Mapping[str, Any]: ...

    def begin_round(self, round_: int) -> None: ...

    def record(self, reply: Message, round_: int, kind: str) -> DeviceRecord: ...


class NodeMap:
    """For a Flower deployment's grid: device indices learnt from the replies (each says which device it
    is); a node that never answered is known by its node id."""

    def __init__(self, describe: Callable[[int], Mapping[str, Any]] = lambda index: {}):
        self.devices: dict[int, int] = {}
        self._describe = describe

    def device_of(self, node_id: int) -> int:
        return self.devices.get(node_id, node_id)

    def describe(self, index: int) -> Mapping[str, Any]:
        return self._describe(index)

    def begin_round(self, round_: int) -> None:
        pass

    def record(self, reply: Message, round_: int, kind: str) -> DeviceRecord:
        return record_from_reply(reply, round_, kind, self.device_of, self.describe)

    def learn(self, replies: Iterable[Message]) -> None:
        for reply in replies:
            if reply.has_content():
                for metrics in reply.content.metric_records.values():
                    if isinstance(metrics.get("device"), int):
                        self.devices[reply.metadata.src_node_id] = int(metrics["device"])


class Checkpoint(Protocol):
    def __call__(self, log: RoundLog, arrays: ArrayRecord, state: Mapping[str, np.ndarray]) -> None: ...


class Submitted(Protocol):
    def replies(self) -> list[Message]: ...


def evaluation_feeds_training(strategy: Any) -> bool:
    """Whether the strategy (or one it wraps) may use what ``aggregate_evaluate`` sees when it next configures
    training: any strategy whose ``aggregate_evaluate`` is not Flower's or edgefleet's own."""
    while strategy is not None:
        module = getattr(type(strategy).aggregate_evaluate, "__module__", "") or ""
        if not module.startswith(("flwr.", "fleet.")):
            return True
        strategy = getattr(strategy, "strategy", None)
    return False


def seed_round(seed: int, round_: int) -> None:
    """What makes a round's random draws a function of (seed, round) alone."""
    random.seed(f"{seed}-{round_}")                       # Flower's node sampling
    np.random.seed(np.random.SeedSequence([seed, round_]).generate_state(1)[0])  # DP wrappers' noise


class RoundDriver:
    def __init__(self, strategy: Any, grid: Grid, fleet: FleetAwareGrid | None = None, *, seed: int = 0,
                 observers: Sequence[RoundObserver] = (), checkpoint: Checkpoint | None = None,
                 train_config: Mapping[str, Any] | None = None, evaluate_config: Mapping[str, Any] | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        self.strategy = strategy
        self.grid = grid
        self.fleet: FleetAwareGrid = fleet if fleet is not None else (grid if hasattr(grid, "device_of") else NodeMap())
        self.seed = seed
        self.observers = list(observers)
        self.checkpoint = checkpoint
        self.train_config = dict(train_config or {})
        self.evaluate_config = dict(evaluate_config or {})
        self.timeout_s = timeout_s
        self.round_seconds: list[float] = []  # each round's duration (its RoundLog goes to the observers, and
        self.last_log: RoundLog | None = None  # only the newest stays here: a long run's memory does not grow)

    def run(self, arrays: ArrayRecord, first_round: int, last_round: int) -> ArrayRecord:
        """Rounds ``first_round`` … ``last_round`` (inclusive) from the global ``arrays``; the final arrays."""
        ahead = None
        for round_ in range(first_round, last_round + 1):
            arrays, ahead = self._round(round_, arrays, last_round, ahead, ahead_allowed=round_ < last_round)
        return arrays

    def round(self, round_: int, arrays: ArrayRecord, total_rounds: int = 0) -> ArrayRecord:
        """One round on its own (nothing sent ahead for the next)."""
        return self._round(round_, arrays, total_rounds, None, ahead_allowed=False)[0]

    def _pipelined(self) -> bool:
        return getattr(self.grid, "ahead", False) and hasattr(self.grid, "submit") and \
            not evaluation_feeds_training(self.strategy)

    def _send_train(self, round_: int, arrays: ArrayRecord) -> tuple[list[Message], Submitted | None, list[int]]:
        """Round ``round_``'s train instructions, sent (when the grid can take them now): (messages, what was
        submitted, the sampled devices). Observers that track devices hear of the jobs before they go."""
        self.fleet.begin_round(round_)  # (the grid lists the nodes online in this round)
        seed_round(self.seed, round_)
        messages = list(self.strategy.configure_train(round_, arrays, ConfigRecord(dict(self.train_config)),
                                                      self.grid))
        sampled = sorted(self.fleet.device_of(m.metadata.dst_node_id) for m in messages)
        for observer in self.observers:  # optional: observers that track devices' states (the exporter)
            if hasattr(observer, "jobs_sent"):
                observer.jobs_sent(round_, sampled)
        return messages, self._submit(messages, round_), sampled

    def _round(self, round_: int, arrays: ArrayRecord, total_rounds: int,
               ahead: tuple[list[Message], Submitted | None, list[int]] | None,
               ahead_allowed: bool) -> tuple[ArrayRecord, Any]:
        log = RoundLog(round_, started_at=time.time())
        self.fleet.begin_round(round_)
        for observer in self.observers:
            observer.begin_round(round_, total_rounds)
        clock = time.perf_counter()

        # sent now, or while the previous round's evaluation was collected
        messages, submitted, log.sampled = self._send_train(round_, arrays) if ahead is None else ahead
        replies = self._collect(messages, submitted, round_, log)
        log.timings["train_s"], clock = time.perf_counter() - clock, time.perf_counter()
        aggregated, train_metrics = self.strategy.aggregate_train(round_, replies)
        log.timings["aggregate_train_s"], clock = time.perf_counter() - clock, time.perf_counter()
        log.rejected = {k: int(v) for k, v in dict(getattr(self.strategy, "rejected", {}) or {}).items()}
        if aggregated is not None:
            arrays = aggregated

        messages = list(self.strategy.configure_evaluate(round_, arrays, ConfigRecord(dict(self.evaluate_config)),
                                                         self.grid))
        submitted = self._submit(messages, round_)
        state = None  # the strategy's state for the checkpoint, when taken before the next round's first hook
        if ahead_allowed and self._pipelined():
            if self.checkpoint is not None:
                state = strategy_state(self.strategy, copy=True)
            ahead = self._send_train(round_ + 1, arrays)
        else:
            ahead = None
        replies = self._collect(messages, submitted, round_, log)
        log.timings["evaluate_s"], clock = time.perf_counter() - clock, time.perf_counter()
        evaluate_metrics = self.strategy.aggregate_evaluate(round_, replies)
        log.timings["aggregate_evaluate_s"] = time.perf_counter() - clock

        log.server_metrics = _metrics("train", train_metrics) | _metrics("evaluate", evaluate_metrics)
        log.ended_at = time.time()
        self.round_seconds.append(log.duration_s)
        self.last_log = log
        for observer in self.observers:
            observer.end_round(log)
        if self.checkpoint is not None:
            self.checkpoint(log, arrays, strategy_state(self.strategy, copy=True) if state is None else state)
        return arrays, ahead

    def _submit(self, messages: list[Message], round_: int) -> Submitted | None:
        """Send ``messages`` now when the grid can take them ahead of their replies (else at ``_collect``)."""
        if not messages or not hasattr(self.grid, "submit"):
            return None
        return self.grid.submit(messages, round_)

    def _collect(self, messages: list[Message], submitted: Submitted | None, round_: int,
                 log: RoundLog) -> list[Message]:
        if not messages:
            return []
        kind = instruction(messages[0])
        replies = submitted.replies() if submitted is not None else \
            list(self.grid.send_and_receive(messages, timeout=self.timeout_s))
        if isinstance(self.fleet, NodeMap):
            self.fleet.learn(replies)
        for reply in replies:
            record = self.fleet.record(reply, round_, kind)
            log.devices.append(record)
            for observer in self.observers:
                observer.device_done(record)
        return replies


def _metrics(prefix: str, record: MetricRecord | None) -> dict[str, float]:
    if record is None:
        return {}
    return {f"{prefix}.{k}": float(v) for k, v in record.items() if isinstance(v, (int, float))}


# ---- strategy state (for exact resume) --------------------------------------------------------------------

_SKIP_ATTRS = frozenset({"rejected", "rejected_total", "_sent"})


def strategy_state(strategy: Any, prefix: str = "", copy: bool = False) -> dict[str, np.ndarray]:
    """Every array and number a strategy (and any strategy it wraps) holds, as named numpy arrays: FedOpt's
    moments and current arrays, FedAvgM's momentum, the DP wrappers' clipping norm, the LoRA strategies'
    learnt ranks. Restored by ``restore_strategy_state`` on resume."""
    out: dict[str, np.ndarray] = {}
    for attr, value in vars(strategy).items():
        if attr in _SKIP_ATTRS:
            continue
        key = f"{prefix}{attr}"
        if hasattr(value, "configure_train") and hasattr(value, "aggregate_train"):
            out.update(strategy_state(value, key + "."))
        elif isinstance(value, np.ndarray):
            out[key] = value
        elif isinstance(value, ArrayRecord):
            out.update({f"{key}:record/{k}": v.numpy() for k, v in value.items()})
        elif isinstance(value, (bool, int, float)) and not isinstance(value, np.generic):
            out[f"{key}:scalar"] = np.asarray(value)
        elif isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
            out.update({f"{key}:dict/{k}": v for k, v in value.items()})
        elif isinstance(value, dict) and value and all(isinstance(k, int) and isinstance(v, int)
                                                       for k, v in value.items()):
            out.update({f"{key}:intmap/{k}": np.asarray(v) for k, v in value.items()})
        elif isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value):
            out.update({f"{key}:list/{i}": v for i, v in enumerate(value)})
    return {k: np.array(v, copy=True) for k, v in out.items()} if copy else out


def restore_strategy_state(strategy: Any, state: Mapping[str, np.ndarray]) -> None:
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        path, _, item = key.partition("/")
        grouped.setdefault(path, {})[item] = value
    for path, items in grouped.items():
        name, _, form = path.partition(":")
        *owners, attr = name.split(".")
        target = strategy
        for owner in owners:
            target = getattr(target, owner)
        if form == "":
            value = items[""]
        elif form == "scalar":
            value = items[""].item()
        elif form == "record":
            from fleet.arrays import to_record
            value = to_record({k: np.asarray(v) for k, v in items.items()})
        elif form == "dict":
            value = {k: np.asarray(v) for k, v in items.items()}
        elif form == "intmap":
            value = {int(k): int(v) for k, v in items.items()}
        elif form == "list":
            value = [np.asarray(items[str(i)]) for i in range(len(items))]
        else:
            raise ValueError(f"strategy state key {path!r}: unknown form {form!r}")
        setattr(target, attr, value)
