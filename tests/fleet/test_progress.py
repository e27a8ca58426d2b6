"""The live progress display: bars that advance per device record, elapsed time and an ETA; one line per
round when the output is not a terminal."""
from __future__ import annotations

import io

import pytest

from fleet.progress import RunProgress, format_duration
from tests.fleet.round_logs import round_logs


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bars_advance_per_device_and_eta_follows_round_times():
    logs = round_logs(12, 3)
    clock = Clock()
    stream = io.StringIO()
    progress = RunProgress(3, stream=stream, live=True, clock=clock)
    try:
        for i, log in enumerate(logs):
            progress.begin_round(log.round, 3)
            for n, record in enumerate(log.devices, 1):
                progress.device_done(record)
                assert progress.progress.tasks[progress.round_task].completed == n
            if i == 1:  # the second round knows the first round's job count: the run bar moves within it
                run_task = progress.progress.tasks[progress.run_task]
                assert run_task.total == 3 and 1 < run_task.completed <= 2
                assert progress.progress.tasks[progress.round_task].total == len(logs[0].devices)
            clock.now += 10.0 * (i + 1)
            progress.end_round(log)
            assert progress.eta_s(log.round) == pytest.approx((3 - log.round) * sum(10.0 * (k + 1) for k in range(i + 1))
                                                              / (i + 1))
    finally:
        progress.close()
    text = stream.getvalue()
    assert "round 1/3" in text and "round 3/3" in text and "eta" in text and "elapsed 1:00" in text


def test_one_line_per_round_off_a_terminal():
    stream = io.StringIO()
    with RunProgress(2, stream=stream) as progress:
        for log in round_logs(6, 2):
            progress.begin_round(log.round, 2)
            for record in log.devices:
                progress.device_done(record)
            progress.end_round(log)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("round 1/2") and "failures" in lines[0]


def test_quiet_prints_nothing():
    stream = io.StringIO()
    with RunProgress(1, stream=stream, enabled=False) as progress:
        log = round_logs(4, 1)[0]
        progress.begin_round(1, 1)
        progress.end_round(log)
    assert stream.getvalue() == ""


def test_format_duration():
    assert [format_duration(s) for s in (5, 65, 3725, float("nan"))] == ["0:05", "1:05", "1:02:05", "-"]
