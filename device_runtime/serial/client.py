"""Board commands on top of a BoardLink: hello, chunked region writes and reads, commit, checksum, run,
counters, reset (docs/boards.md). Transfers are chunked; a chunk that needed a resend halves the chunk size
(down to ``MIN_CHUNK_BYTES``: on a noisy line short frames get through where long ones do not), and a run of
clean chunks doubles it back."""
from __future__ import annotations

from typing import Sequence

from device_runtime.serial import framing as fr
from device_runtime.serial.link import BoardLink, LinkError, LinkTimeout

PROTOCOL_VERSION = 1
HELLO_TIMEOUT_S = 1.5
MIN_CHUNK_BYTES = 64
MAX_CHUNK_BYTES = fr.MAX_PAYLOAD_BYTES - fr.WRITE_HEAD.size
CLEAN_CHUNKS_TO_GROW = 8
MAX_SPANS_PER_FRAME = (fr.MAX_PAYLOAD_BYTES - fr.COMMIT_HEAD.size) // fr.SPAN.size


class BoardClient:
    def __init__(self, link: BoardLink, run_step_timeout_s: float):
        self.link = link
        self.run_step_timeout_s = run_step_timeout_s
        self.chunk_bytes = MAX_CHUNK_BYTES
        self._clean = 0

    def hello(self) -> fr.Hello:
        # a freshly opened port may drop the first bytes (QEMU polls a pty for a reader once a second)
        hello = fr.Hello.from_bytes(self.link.request(fr.HELLO, timeout_s=max(self.link.timeout_s, HELLO_TIMEOUT_S)))
        if hello.protocol_version != PROTOCOL_VERSION:
            raise LinkError(f"{self.link.url}: board speaks protocol version {hello.protocol_version}; "
                            f"this host speaks {PROTOCOL_VERSION}")
        self.chunk_bytes = min(self.chunk_bytes, hello.max_payload_bytes - fr.WRITE_HEAD.size)
        return hello

    def reset(self) -> None:
        self.link.request(fr.RESET)

    def _adapt(self, resends_before: int) -> None:
        if self.link.stats.resends > resends_before:
            self.chunk_bytes = max(MIN_CHUNK_BYTES, self.chunk_bytes // 2)
            self._clean = 0
        else:
            self._clean += 1
            if self._clean >= CLEAN_CHUNKS_TO_GROW:
                self.chunk_bytes = min(MAX_CHUNK_BYTES, self.chunk_bytes * 2)
                self._clean = 0

    def _chunk_request(self, kind: int, payload: bytes, reply_bytes: int) -> bytes | None:
        """One chunk's request; None when it timed out and the chunk size was halved (try again smaller).
        Writes and reads are idempotent, so a chunk may be sent again under a new sequence number."""
        before = self.link.stats.resends
        try:
            out = self.link.request(kind, payload, reply_bytes=reply_bytes)
        except LinkTimeout:
            if self.chunk_bytes <= MIN_CHUNK_BYTES:
                raise
            self.chunk_bytes = max(MIN_CHUNK_BYTES, self.chunk_bytes // 2)
            self._clean = 0
            return None
        self._adapt(before)
        return out

    def write(self, region: int, offset: int, data: bytes) -> None:
        done = 0
        while done < len(data):
            piece = data[done: done + self.chunk_bytes]
            if self._chunk_request(fr.WRITE, fr.write_payload(region, offset + done, piece), 16) is not None:
                done += len(piece)

    def read(self, region: int, offset: int, length: int) -> bytes:
        parts = []
        done = 0
        while done < length:
            want = min(self.chunk_bytes, length - done)
            got = self._chunk_request(fr.READ, fr.read_payload(region, offset + done, want), want + 16)
            if got is None:
                continue
            if len(got) != want:
                raise LinkError(f"{self.link.url}: read of {want} bytes answered with {len(got)}")
            parts.append(got)
            done += want
        return b"".join(parts)

    def commit(self, region: int, spans: Sequence[tuple[int, int]], crc: int) -> None:
        """The board checks the CRC-32 of ``spans`` (in order) against ``crc`` and only then marks the region
        usable; a mismatch is a BoardError and the region stays unusable."""
        if len(spans) > MAX_SPANS_PER_FRAME:
            raise LinkError(f"{len(spans)} spans > {MAX_SPANS_PER_FRAME} per commit")
        self.link.request(fr.COMMIT, fr.commit_payload(region, crc, spans), timeout_s=self._crc_timeout(spans))

    def checksum(self, region: int, spans: Sequence[tuple[int, int]]) -> int:
        if len(spans) > MAX_SPANS_PER_FRAME:
            raise LinkError(f"{len(spans)} spans > {MAX_SPANS_PER_FRAME} per checksum")
        (crc,) = fr.unpack_reply(fr.CHECKSUM_REPLY, self.link.request(
            fr.CHECKSUM, fr.checksum_payload(region, spans), timeout_s=self._crc_timeout(spans)), "checksum")
        return crc

    def _crc_timeout(self, spans: Sequence[tuple[int, int]]) -> float:
        return self.link.timeout_s + sum(n for _, n in spans) / 1e6   # ~1 MB/s CRC on the slowest board

    def run(self, mode: int, steps: int, batch_crc: int) -> fr.RunReply:
        payload = self.link.request(fr.RUN, fr.run_payload(mode, steps, batch_crc),
                                    timeout_s=self.link.timeout_s + steps * self.run_step_timeout_s)
        return fr.RunReply(*fr.unpack_reply(fr.RUN_REPLY, payload, "run"))

    def counters(self) -> fr.Counters:
        return fr.Counters(*fr.unpack_reply(fr.COUNTERS_REPLY, self.link.request(fr.COUNTERS), "counters"))
