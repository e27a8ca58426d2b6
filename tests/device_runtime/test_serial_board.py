"""A QEMU-emulated board on a pty (qemu-system-riscv32 -machine virt -serial pty, the rv32-qemu-serial
firmware) driven through the serial Device backend: same numbers as the numpy executor, and the board's
own rules (commit by CRC-32, batch CRC, duplicate frames answered from the cache)."""
from __future__ import annotations

import numpy as np
import pytest

from device_runtime import NumpyDevice
from device_runtime.device import DeviceError
from device_runtime.serial import framing as fr
from device_runtime.serial.client import BoardClient
from device_runtime.serial.device import SerialDevice
from device_runtime.serial.link import BoardError, BoardLink, SerialTransport
from device_runtime.serial.qemu_board import QemuBoard, build_serial_firmware
from tests.codegen.programs import assert_same_training, compiled, data_for, rel_diff


def test_board_trains_and_evaluates_like_numpy(mlp_program, qemu_board):
    x, y = data_for(mlp_program, 12)
    board = SerialDevice(mlp_program, qemu_board.url)
    assert (board.hello.target, board.hello.params_bytes) == ("rv32-qemu", mlp_program.params_bytes)
    oracle = NumpyDevice(mlp_program)
    got = board.train(x, y, 3, lr=0.02)
    assert_same_training(got, oracle.train(x, y, 3, lr=0.02))
    t = got.telemetry
    assert t.measured_cycles > 0 and t.instructions > 0 and t.link_s > 0 and t.link_bytes > 0
    assert 0 < t.peak_bytes_by_level["board"] < board.hello.ram_bytes
    start = {n: v + 0.01 for n, v in got.params.items()}                 # the server's next adapter
    board.set_params(start)
    oracle.set_params(start)
    assert_same_training(board.train(x, y, 2), oracle.train(x, y, 2))
    want, have = oracle.evaluate(x[:7], y[:7]), board.evaluate(x[:7], y[:7])
    assert have.outputs.shape == want.outputs.shape and rel_diff(have.outputs, want.outputs) <= 1e-5
    assert have.loss == pytest.approx(want.loss, rel=1e-5)
    board.close()


def test_socket_url_is_the_same_code_path(mlp_program, mlp_firmware):
    x, y = data_for(mlp_program, 8)
    with QemuBoard(mlp_firmware, transport="tcp") as qemu:
        assert qemu.url.startswith("socket://127.0.0.1:")
        board = SerialDevice(mlp_program, qemu.url)
        assert_same_training(board.train(x, y, 2), NumpyDevice(mlp_program).train(x, y, 2))
        board.close()


def test_board_refuses_uncommitted_or_corrupt_parameters_and_batches(mlp_program, qemu_board):
    client = BoardClient(BoardLink(SerialTransport(qemu_board.url)), run_step_timeout_s=10)
    client.hello()
    size = mlp_program.tensors[mlp_program.input].nbytes + mlp_program.tensors[mlp_program.label].nbytes
    batch_crc = fr.crc32(bytes(size))                          # the staged batch is all zeros at boot
    with pytest.raises(BoardError, match="parameters not committed"):
        client.run(fr.MODE_TRAIN, 1, batch_crc)                # nothing loaded yet
    client.commit(fr.PARAMS, [(0, 64)], fr.crc32(client.read(fr.PARAMS, 0, 64)))
    client.run(fr.MODE_TRAIN, 1, batch_crc)
    client.write(fr.PARAMS, 0, bytes(64))                      # a transfer that is never committed ...
    with pytest.raises(BoardError, match="parameters not committed"):
        client.run(fr.MODE_TRAIN, 1, batch_crc)
    with pytest.raises(BoardError, match="checksum mismatch"):
        client.commit(fr.PARAMS, [(0, 64)], fr.crc32(bytes(64)) ^ 1)   # ... or committed with another CRC
    with pytest.raises(BoardError, match="parameters not committed"):
        client.run(fr.MODE_TRAIN, 1, batch_crc)
    client.commit(fr.PARAMS, [(0, 64)], fr.crc32(bytes(64)))
    with pytest.raises(BoardError, match="batch checksum mismatch"):
        client.run(fr.MODE_TRAIN, 1, batch_crc ^ 1)
    assert client.run(fr.MODE_TRAIN, 1, batch_crc).steps == 1
    with pytest.raises(BoardError, match="out of range"):
        client.read(fr.PARAMS, mlp_program.params_bytes - 4, 8)
    assert client.counters().steps == 2
    client.link.close()


def test_a_repeated_frame_is_answered_from_the_cache_not_run_twice(mlp_program, qemu_board):
    link = BoardLink(SerialTransport(qemu_board.url))
    client = BoardClient(link, run_step_timeout_s=10)
    client.hello()
    client.commit(fr.PARAMS, [(0, 64)], fr.crc32(client.read(fr.PARAMS, 0, 64)))
    size = mlp_program.tensors[mlp_program.input].nbytes + mlp_program.tensors[mlp_program.label].nbytes
    wire = fr.DELIMITER + fr.encode_frame(fr.Frame(fr.RUN, 4242, fr.run_payload(fr.MODE_TRAIN, 1, fr.crc32(bytes(size)))))
    replies = []
    for _ in range(2):
        link.transport.send(wire)
        while not replies or len(replies) < _ + 1:
            replies += [f for f in link.reader.feed(link.transport.receive(1.0)) if isinstance(f, fr.Frame)]
    assert replies[0] == replies[1] and replies[0].kind == fr.REPLY_OK
    assert client.counters().steps == 1
    link.close()


def test_a_board_with_another_program_is_refused(qemu_board):
    other = compiled("torch-mlp", "classifier")
    with pytest.raises(DeviceError, match="holds program .* flash it first"):
        SerialDevice(other, qemu_board.url)


def test_firmware_build_is_reused(mlp_program, mlp_firmware):
    assert build_serial_firmware(mlp_program) == mlp_firmware
    assert np.frombuffer(mlp_firmware.read_bytes()[:4], np.uint8).tolist() == [0x7F, ord("E"), ord("L"), ord("F")]


def test_boards_scan_finds_the_qemu_board_on_its_pty(qemu_board, capsys):
    from fleet.cli import main
    assert main(["boards", "scan", "--json"]) == 0
    import json
    found = {item["port"]: item["answer"] for item in json.loads(capsys.readouterr().out)}
    hello = found[qemu_board.url]
    assert hello["target"] == "rv32-qemu" and hello["protocol_version"] == 1 and hello["params_bytes"] > 0
