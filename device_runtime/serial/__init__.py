"""Dev boards on a serial line: framing without I/O (framing), the pyserial link (link), board commands
(client), the Device backend (device) and a QEMU-emulated board on a pty (qemu_board). docs/boards.md."""
from device_runtime.serial.link import BoardError, Disconnected, LinkError, LinkTimeout

__all__ = ["BoardError", "Disconnected", "LinkError", "LinkTimeout"]
