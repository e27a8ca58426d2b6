import pytest

from device_runtime.serial.qemu_board import QemuBoard, build_serial_firmware
from tests.codegen.programs import compiled


@pytest.fixture(scope="session")
def mlp_program():
    return compiled("torch-mlp", "lora+head")


@pytest.fixture(scope="session")
def mlp_firmware(mlp_program):
    return build_serial_firmware(mlp_program)


@pytest.fixture
def qemu_board(mlp_firmware):
    """A fresh QEMU-emulated board running the torch-mlp serial firmware, its UART on a pty."""
    board = QemuBoard(mlp_firmware)
    yield board
    board.stop()
