"""Faults between the host and a QEMU-emulated board (a relay on a pty pair in between): bit errors, dropped
and inserted bytes, a stalled board, a pulled cable, a killed board. Every altered frame is rejected; each
transfer completes exactly or fails with one cause, and no partial parameters are ever taken."""
from __future__ import annotations

import numpy as np
import pytest

from device_runtime import NumpyDevice
from device_runtime.serial import framing as fr
from device_runtime.serial.device import SerialDevice
from device_runtime.serial.link import Disconnected, LinkError, LinkTimeout
from device_runtime.serial.relay import Faults, Relay
from tests.codegen.programs import assert_same_training, data_for

NOISY_S = 0.2          # per-attempt deadline on these lines (QEMU answers in milliseconds)


def assert_altered_frames_rejected(relay: Relay) -> int:
    altered = relay.to_board.altered() + relay.to_host.altered()
    for packet in altered:
        with pytest.raises(fr.FrameError):
            fr.decode_frame(packet)
    return len(altered)


def train_exactly_or_fail_cleanly(program, url: str, x, y, steps: int) -> str:
    """Train over a faulty line: the result equals the oracle's, or the job fails with a protocol cause and
    the host's parameters are untouched. Returns "ok" or the cause."""
    want = NumpyDevice(program).train(x, y, steps)
    try:
        board = SerialDevice(program, url, retries=12, command_timeout_s=NOISY_S)
    except LinkError as exc:                      # even the hello may not get through
        assert exc.cause in ("timeout", "error")
        return exc.cause
    before = board.get_params()
    try:
        assert_same_training(board.train(x, y, steps), want)
        return "ok"
    except LinkError as exc:
        assert exc.cause in ("timeout", "error")
        for name, value in board.get_params().items():
            np.testing.assert_array_equal(value, before[name])
        return exc.cause
    finally:
        board.close()


@pytest.mark.parametrize("faults", [Faults(bit_error_rate=3e-4, drop_rate=2e-4, garbage_rate=2e-4),
                                    Faults(bit_error_rate=1e-3)], ids=["mixed", "bits-1e-3"])
def test_faulty_line_trains_exactly_or_fails_cleanly_and_rejects_every_altered_frame(mlp_program, qemu_board,
                                                                                     faults):
    x, y = data_for(mlp_program, 12)
    with Relay(qemu_board.url, faults, seed=3) as relay:
        outcome = train_exactly_or_fail_cleanly(mlp_program, relay.url, x, y, 2)
        assert relay.to_board.bits_flipped + relay.to_host.bits_flipped > 0
        assert assert_altered_frames_rejected(relay) > 0
    print(f"\n{faults}: {outcome}")


def test_stalled_board_times_out_keeps_the_old_parameters_and_serves_the_next_job(mlp_program, qemu_board):
    x, y = data_for(mlp_program, 8)
    oracle = NumpyDevice(mlp_program)
    with Relay(qemu_board.url) as relay:
        board = SerialDevice(mlp_program, relay.url, retries=2, command_timeout_s=NOISY_S, run_step_timeout_s=0.5)
        assert_same_training(board.train(x, y, 1), oracle.train(x, y, 1))
        before = board.get_params()
        relay.stall()
        with pytest.raises(LinkTimeout) as err:
            board.train(x, y, 2)
        assert err.value.cause == "timeout"
        for name, value in board.get_params().items():
            np.testing.assert_array_equal(value, before[name])
        relay.stall(False)
        assert_same_training(board.train(x, y, 2), oracle.train(x, y, 2))   # the next round: as the oracle
        board.close()


def test_cable_pulled_mid_download_keeps_the_old_parameters(mlp_program, qemu_board):
    x, y = data_for(mlp_program, 8)
    with Relay(qemu_board.url) as probe:                 # where the download starts and ends on this line
        warm = SerialDevice(mlp_program, probe.url)
        marks = []
        download = warm._download
        warm._download = lambda spans: (marks.append(probe.to_host.bytes_out), download(spans),
                                        marks.append(probe.to_host.bytes_out))
        warm.train(x, y, 1)
        warm.close()
    assert marks[1] - marks[0] > 1000
    with Relay(qemu_board.url, Faults(pull_after_bytes=(marks[0] + marks[1]) // 2)) as relay:
        board = SerialDevice(mlp_program, relay.url)
        before = board.get_params()
        with pytest.raises(Disconnected) as err:
            board.train(x, y, 1)
        assert err.value.cause == "disconnected"
        for name, value in board.get_params().items():
            np.testing.assert_array_equal(value, before[name])


def test_killed_board_is_disconnected(mlp_program, qemu_board):
    x, y = data_for(mlp_program, 8)
    board = SerialDevice(mlp_program, qemu_board.url)
    board.train(x, y, 1)
    qemu_board.kill()
    with pytest.raises(LinkError) as err:
        board.train(x, y, 1)
    assert err.value.cause in ("disconnected", "timeout")
