"""The board link without a board: deadlines on an injected clock, retries, the one Disconnected error."""
from __future__ import annotations

import os
import tty

import pytest

from device_runtime.serial import framing as fr
from device_runtime.serial.link import BoardLink, Disconnected, LinkTimeout, SerialTransport


class SilentLine:
    """A line where nothing ever answers (a stalled board); time passes only on the fake clock."""
    url = "silent://"

    def __init__(self, clock):
        self.clock = clock
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def receive(self, timeout_s: float) -> bytes:
        self.clock.now += timeout_s
        return b""

    def close(self) -> None:
        pass


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_stalled_board_times_out_after_bounded_retries_without_sleeping():
    clock = FakeClock()
    line = SilentLine(clock)
    link = BoardLink(line, retries=3, timeout_s=0.5, baud_rate=115200, clock=clock)
    with pytest.raises(LinkTimeout, match="no valid reply to hello after 4 attempts"):
        link.request(fr.HELLO)
    assert len(line.sent) == 4 and len(set(line.sent)) == 1          # the same frame, same sequence number
    assert link.stats.timeouts == 4 and link.stats.resends == 3
    assert 4 * 0.5 <= clock.now <= 4 * 0.6 and link.stats.link_s == pytest.approx(clock.now)
    assert LinkTimeout.cause == "timeout"


def test_loopback_hears_its_own_command_and_refuses_it_as_a_reply():
    """On pyserial's loop:// the command comes back: right sequence number, but not a reply kind."""
    link = BoardLink(SerialTransport("loop://"), retries=1, timeout_s=0.05)
    with pytest.raises(LinkTimeout):
        link.request(fr.COUNTERS)
    assert link.stats.unexpected_frames == 2 and link.stats.replies == 0 and link.stats.corrupt_frames == 0


def test_serial_errors_become_disconnected():
    with pytest.raises(Disconnected, match="cannot open /nonexistent/ttyUSB9"):
        SerialTransport("/nonexistent/ttyUSB9")
    master, slave = os.openpty()
    tty.setraw(slave)
    transport = SerialTransport(os.ttyname(slave))
    os.close(master)                                                 # the cable comes out
    os.close(slave)
    link = BoardLink(transport, retries=0, timeout_s=1.0)
    with pytest.raises(Disconnected) as err:
        link.request(fr.HELLO)
    assert err.value.cause == "disconnected"
    transport.close()
