"""Whole gRPC messages out of a streaming call's body as its DATA frames arrive.

A bidirectional stream (KServe V2 `ModelStreamInfer`) may stay open for hours: waiting for its
end to decode it would show nothing meanwhile and cut it at the body cap. The HTTP/2 decoder
feeds such a stream's bytes here instead of keeping them, and hands out its messages as soon as
they pair (agent/protocols/http2.py), so memory holds only messages not yet handed out.
"""

from __future__ import annotations

from infertap.agent.protocols.content import GRPC_PREFIX_LEN, decode_content


class GrpcMessageSplitter:
    """Messages of one direction of a gRPC stream, each with the kernel time of the send that
    carried its first byte. `broken` once a message cannot be taken whole (over `limit`, or
    compressed with an encoding we do not decode): nothing after it is trusted."""

    def __init__(self, encoding: str, limit: int) -> None:
        self._encoding = encoding
        self._limit = limit
        self._buf = bytearray()
        self._buf_ts = 0  # when the first byte in _buf was sent
        self.messages: list[bytes] = []
        self.times: list[int] = []
        self.pending_bytes = 0  # bytes of messages not handed out yet
        self.broken = False

    def feed(self, data: bytes | memoryview, ts: int) -> None:
        if self.broken:
            return
        if not self._buf:
            self._buf_ts = ts
        self._buf += data
        buf = self._buf
        while len(buf) >= GRPC_PREFIX_LEN:
            length = int.from_bytes(buf[1:GRPC_PREFIX_LEN], "big")
            if length > self._limit:
                self.broken = True
                buf.clear()
                return
            end = GRPC_PREFIX_LEN + length
            if len(buf) < end:
                return
            compressed = buf[0] & 1
            payload = bytes(buf[GRPC_PREFIX_LEN:end])
            del buf[:end]
            if compressed:
                decoded = decode_content(payload, self._encoding or "identity", self._limit, True)
                if not self._encoding or not decoded.ok or not decoded.complete:
                    self.broken = True
                    buf.clear()
                    return
                payload = decoded.data
            self.messages.append(payload)
            self.times.append(self._buf_ts)
            self.pending_bytes += len(payload)
            self._buf_ts = ts  # what is left in buf began in this send

    @property
    def partial(self) -> bool:
        """Bytes of a message not complete yet (or lost): the body is not whole."""
        return bool(self._buf) or self.broken

    def take(self, n: int | None = None) -> tuple[list[bytes], list[int]]:
        """Hand out the first n messages (all when None) and forget them."""
        n = len(self.messages) if n is None else n
        msgs, times = self.messages[:n], self.times[:n]
        del self.messages[:n]
        del self.times[:n]
        self.pending_bytes -= sum(len(m) for m in msgs)
        return msgs, times
