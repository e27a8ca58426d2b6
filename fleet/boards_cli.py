"""`edgefleet boards scan | probe PORT | flash PORT PROGRAM`: dev boards on serial lines (docs/boards.md)."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

SCAN_TIMEOUT_S = 0.3          # per attempt of the hello on each port
SCAN_RETRIES = 1
PROBE_BYTES = 16 * 1024       # link throughput probe: read this much of the parameter region


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("boards", help="dev boards on serial lines: scan, probe, flash",
                              description="Find, probe and flash dev boards on serial lines (docs/boards.md).")
    sub = p.add_subparsers(dest="boards_command", required=True)
    scan = sub.add_parser("scan", help="list serial ports and what answers the hello")
    scan.add_argument("--port", action="append", default=[], help="also try this port or URL (repeatable)")
    scan.add_argument("--baud", type=int, default=115200)
    scan.add_argument("--json", action="store_true")
    scan.set_defaults(handler=scan_cmd)
    probe = sub.add_parser("probe", help="hello, a parameter round trip and the link throughput of one board")
    probe.add_argument("port", help="a port path or pyserial URL (/dev/ttyUSB0, /dev/pts/3, socket://host:port)")
    probe.add_argument("--baud", type=int, default=115200)
    probe.add_argument("--json", action="store_true")
    probe.set_defaults(handler=probe_cmd)
    flash = sub.add_parser("flash", help="put a program on a board; without a flashable board, start a QEMU "
                                         "board with it on a pty")
    flash.add_argument("port", help="the board's port, or 'qemu' to start an emulated board")
    flash.add_argument("program", help="a program directory (edgefleet compile -o DIR)")
    flash.set_defaults(handler=flash_cmd)
    return p


def candidate_ports() -> list[str]:
    """USB/platform serial ports (pyserial's list), and the ptys of running QEMU boards (found through the
    pty master each qemu-system process holds, so other terminals are never written to)."""
    from serial.tools import list_ports
    ports = [p.device for p in list_ports.comports()]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if not Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system"):
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/ptmx":
                    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
                        if line.startswith("tty-index:"):
                            ports.append(f"/dev/pts/{line.split()[1]}")
        except OSError:
            continue
    return ports


def hello_at(url: str, baud: int) -> dict[str, Any]:
    from device_runtime.serial.client import BoardClient
    from device_runtime.serial.link import BoardLink, LinkError, SerialTransport
    try:
        link = BoardLink(SerialTransport(url, baud), baud_rate=baud, retries=SCAN_RETRIES, timeout_s=SCAN_TIMEOUT_S)
    except LinkError as exc:
        return {"port": url, "answer": None, "error": str(exc)}
    try:
        return {"port": url, "answer": BoardClient(link, 10.0).hello().to_dict(), "error": ""}
    except LinkError as exc:
        return {"port": url, "answer": None, "error": str(exc)}
    finally:
        link.close()


def scan_cmd(args: argparse.Namespace) -> int:
    found = [hello_at(url, args.baud) for url in dict.fromkeys(candidate_ports() + args.port)]
    if args.json:
        print(json.dumps(found, indent=1))
        return 0
    if not found:
        print("no serial ports")
    for item in found:
        h = item["answer"]
        if h:
            print(f"{item['port']}: {h['target']} firmware {h['firmware_version']} protocol {h['protocol_version']}, "
                  f"program {h['model']!r} hash {h['program_hash']:08x}, {h['params_bytes']} parameter bytes, "
                  f"RAM {h['ram_bytes'] // 1024} KiB")
        else:
            print(f"{item['port']}: no board ({item['error']})")
    return 0


def probe_cmd(args: argparse.Namespace) -> int:
    from device_runtime.serial import framing as fr
    from device_runtime.serial.client import BoardClient
    from device_runtime.serial.link import BoardLink, SerialTransport
    link = BoardLink(SerialTransport(args.port, args.baud), baud_rate=args.baud)
    try:
        client = BoardClient(link, 60.0)
        hello = client.hello()
        size = min(PROBE_BYTES, hello.params_bytes)
        t0 = time.perf_counter()
        data = client.read(fr.PARAMS, 0, size)
        read_s = time.perf_counter() - t0
        if fr.crc32(data) != client.checksum(fr.PARAMS, [(0, size)]):
            raise RuntimeError(f"{args.port}: parameters read back do not match the board's checksum")
        t0 = time.perf_counter()
        client.write(fr.PARAMS, 0, data)                   # the same bytes back: the program is unchanged
        client.commit(fr.PARAMS, [(0, size)], fr.crc32(data))
        write_s = time.perf_counter() - t0
        result = {"port": args.port, "hello": hello.to_dict(), "round_trip_bytes": size,
                  "download_bytes_per_s": size / read_s, "upload_bytes_per_s": size / write_s,
                  "line_bytes_per_s": args.baud / 10, "link": link.stats.to_dict()}
    finally:
        link.close()
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        h = hello
        print(f"{args.port}: {h.target}, program {h.model!r} hash {h.program_hash:08x}")
        print(f"parameter round trip: {size} bytes read, verified by CRC-32, written back and committed")
        print(f"download {result['download_bytes_per_s'] / 1024:.1f} KiB/s, upload "
              f"{result['upload_bytes_per_s'] / 1024:.1f} KiB/s (nominal line {args.baud / 10 / 1024:.1f} KiB/s)")
    return 0


def flash_cmd(args: argparse.Namespace) -> int:
    from compiler.program import Program
    from device_runtime.serial.qemu_board import QemuBoard, build_serial_firmware
    program = Program.load(args.program)
    if args.port != "qemu":
        raise ValueError(f"{args.port}: flashing a physical board is not supported by this firmware yet; use "
                         f"'qemu' to start an emulated board with {args.program}")
    elf = build_serial_firmware(program)
    board = QemuBoard(elf)
    print(f"QEMU board with {program.model!r} on {board.url} (pid {board.process.pid}); Ctrl-C stops it")
    try:
        while board.alive:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        board.stop()
    return 0
