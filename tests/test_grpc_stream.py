"""gRPC messages split out of a streaming call's body as it arrives, in any cut."""

from __future__ import annotations

import gzip
import random
import struct

from infertap.agent.protocols.grpc_stream import GrpcMessageSplitter


def framed(payload: bytes, compressed: bool = False) -> bytes:
    body = gzip.compress(payload) if compressed else payload
    return struct.pack(">BI", int(compressed), len(body)) + body


def test_messages_come_out_whole_whatever_the_cuts_with_their_send_times() -> None:
    msgs = [bytes([i]) * (i * 37 % 300) for i in range(40)]
    wire = b"".join(framed(m) for m in msgs)
    rng = random.Random(3)
    split = GrpcMessageSplitter("", 1 << 20)
    pos, ts = 0, 0
    starts: dict[int, int] = {}  # message start offset -> ts of the send that carried it
    offset = 0
    for m in msgs:
        starts[offset] = -1
        offset += 5 + len(m)
    while pos < len(wire):
        n = rng.randint(1, 50)
        for start in starts:
            if pos <= start < pos + n:
                starts[start] = ts
        split.feed(wire[pos : pos + n], ts)
        pos += n
        ts += 1
    got, times = split.take()
    assert got == msgs and times == list(starts.values())
    assert not split.partial and split.pending_bytes == 0


def test_compressed_partial_and_oversized_messages() -> None:
    split = GrpcMessageSplitter("gzip", 1000)
    split.feed(framed(b"hello" * 10, compressed=True) + framed(b"x")[:3], 7)
    assert split.messages == [b"hello" * 10] and split.partial
    assert split.take(1) == ([b"hello" * 10], [7]) and split.messages == []
    split.feed(framed(b"x")[3:], 8)
    assert split.take() == ([b"x"], [7])  # it began in the earlier send
    assert split.pending_bytes == 0
    split.feed(framed(b"y" * 2000), 9)  # over the limit: nothing after it is trusted
    assert split.broken and split.messages == []
    plain = GrpcMessageSplitter("", 1000)
    plain.feed(framed(b"z", compressed=True), 9)  # compressed without a grpc-encoding
    assert plain.broken
