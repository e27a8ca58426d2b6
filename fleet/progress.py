"""The live progress display of `edgefleet run` (a RoundObserver, drawn with rich).

Two bars: the run (rounds, with elapsed time and an ETA) and the current round (jobs answered). Both
advance as each device's record arrives, so a round of thousands of devices moves chunk by chunk. A round's
job count is not known when it begins; it is taken from the previous round (the first round's bar runs
without a total). One line per finished round is printed above the bars (and is all that is printed when
the output is not a terminal).
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fleet.roundlog import DeviceRecord, RoundLog


class RunProgress:
    def __init__(self, total_rounds: int, *, stream: TextIO | None = None, enabled: bool = True,
                 live: bool | None = None, clock=time.monotonic):
        self.total_rounds = int(total_rounds)
        self.enabled = enabled
        self.clock = clock
        self.console = Console(file=stream or sys.stderr, highlight=False, force_terminal=live)
        self.live = enabled and self.console.is_terminal  # live=None: bars only on a terminal
        self.expected_jobs: int | None = None   # jobs per round, from the previous round
        self.round = 0
        self.done = 0
        self.losses: list[float] = []
        self._loss_sum = 0.0
        self.started = clock()
        self.round_durations: list[float] = []
        self._round_start = self.started
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                                 TimeRemainingColumn(), console=self.console, disable=not self.live,
                                 refresh_per_second=4)
        self.run_task = self.progress.add_task("run", total=self.total_rounds, info="")
        self.round_task = self.progress.add_task("round", total=None, info="")
        if self.live:
            self.progress.start()

    # ---- observer -----------------------------------------------------------------------------------------
    def begin_round(self, round_: int, total_rounds: int) -> None:
        self.round, self.done, self.losses, self._loss_sum = round_, 0, [], 0.0
        self.total_rounds = int(total_rounds)
        self._round_start = self.clock()
        self.progress.update(self.run_task, total=self.total_rounds, completed=round_ - 1,
                             description=f"round {round_}/{self.total_rounds}")
        self.progress.reset(self.round_task, total=self.expected_jobs, completed=0, info="",
                            description="devices")

    def device_done(self, record: DeviceRecord) -> None:
        self.done += 1
        if record.ok and record.instruction == "train" and math.isfinite(record.loss):
            self.losses.append(record.loss)
            self._loss_sum += record.loss
        if not self.live:  # no bar is drawn: nothing to move per device (thousands a round)
            return
        step = 1.0 / self.expected_jobs if self.expected_jobs else 0.0
        loss = f"loss {self._loss_sum / len(self.losses):.4f}" if self.losses else ""
        self.progress.update(self.round_task, advance=1, info=loss)
        if step:  # the run bar moves within a round too
            completed = self.progress.tasks[self.run_task].completed
            self.progress.update(self.run_task, completed=min(completed + step, self.round))

    def end_round(self, log: RoundLog) -> None:
        self.expected_jobs = len(log.devices) or self.expected_jobs
        self.round_durations.append(self.clock() - self._round_start)
        self.progress.update(self.run_task, completed=log.round)
        if self.enabled:
            self.progress.console.print(self.round_line(log), soft_wrap=True, markup=False)

    def round_line(self, log: RoundLog) -> str:
        s = log.summary()
        failures = ", ".join(f"{k} {v}" for k, v in sorted({**s["failures"], **s["unavailable"]}.items())) or "none"
        eta = self.eta_s(log.round)
        return (f"round {log.round}/{self.total_rounds}  train loss {s['train_loss']:.4f}  "
                f"metric {s['metric_after']:.3f}  global {s['global_metric']:.3f}  "
                f"failures {failures}  elapsed {format_duration(self.clock() - self.started)}  "
                f"eta {format_duration(eta)}")

    def eta_s(self, rounds_done: int) -> float:
        if not self.round_durations:
            return math.nan
        recent = self.round_durations[-5:]
        return (self.total_rounds - rounds_done) * sum(recent) / len(recent)

    def close(self) -> None:
        if self.live:
            self.progress.stop()

    def __enter__(self) -> "RunProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
