"""Per-flow byte streams from samples: contiguous data plus exact gap marks, in bounded memory.

A flow's samples arrive in order, each holding stream bytes [offset, offset + len(data)) of a
send that covered [offset, end). Two kinds of holes exist and both have an exact size because
offsets are exact: the uncaptured tail of a truncated send, and samples lost on the way (the next
sample's offset is past the previous one's end). Bytes over a memory limit become a third kind.

The reassembler hands bytes to a `StreamConsumer` as soon as they arrive and keeps only what the
consumer declined (say, the first half of an HTTP/2 frame) until more comes. That retained tail is
the only memory it holds per flow, and both the per-flow and the total limit apply to it. When a
gap comes, the consumer gets the retained bytes one last time ("stranded") together with the size
of the hole after them, so it can skip exactly (e.g. the rest of a frame whose length it knows).

Overload shedding (bpf/infertap.h ITAP_REC_SHED) makes a fourth kind on purpose: the kernel
stopped sampling at a message boundary (`shed`), and the hole up to the next sample, which
starts a message again, or to the flow's end, comes as one SHED gap: nothing decoded is lost.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Protocol

from infertap.agent.flows.records import Sample

log = logging.getLogger(__name__)


class GapCause(enum.Enum):
    TRUNCATED = "truncated"  # the rest of a send was not captured
    LOST = "lost"  # whole samples were lost (ring buffer full, ...)
    OVER_LIMIT = "over_limit"  # retained bytes would have broken a memory bound
    SHED = "shed"  # overload: whole messages not sampled on purpose, from a message boundary


@dataclass(frozen=True, slots=True)
class Chunk:
    """Contiguous bytes for a consumer: `data[:carried]` was retained from earlier sends."""

    data: memoryview
    ts_ns: int  # kernel time of the send that carried data[carried:]
    carried: int = 0
    carried_ts_ns: int = 0  # kernel time of the send that carried data[0], when carried > 0

    def ts_at(self, pos: int) -> int:
        """Kernel time of the send that carried data[pos] (retained bytes start at a send of
        their own only at position 0, which is the only position a decoder declines from)."""
        return self.carried_ts_ns if pos < self.carried else self.ts_ns


class StreamConsumer(Protocol):
    def on_data(self, chunk: Chunk) -> int:
        """Take bytes from the front of chunk.data; return how many. The rest is offered again,
        with more bytes after it, when the next send arrives (or stranded at a gap)."""
        ...

    def on_gap(self, stranded: memoryview, length: int, cause: GapCause, ts_ns: int) -> None:
        """The stream continues `length` bytes after `stranded` (bytes declined before, offered
        one last time). length may be 0 when only the stranded bytes themselves are lost."""
        ...


@dataclass(slots=True)
class ReassemblyStats:
    gaps: int = 0
    gap_bytes: int = 0
    truncated_bytes: int = 0
    lost_bytes: int = 0
    bytes_over_limit: int = 0
    overlap_bytes: int = 0
    evictions: int = 0
    flows_closed: int = 0
    shed_gaps: int = 0  # SHED gaps (not in `gaps`: they lose nothing decoded)
    shed_bytes: int = 0


class _FlowStream:
    __slots__ = ("last_ts_ns", "next_offset", "retained", "retained_ts_ns", "shed_ts_ns")

    def __init__(self, now_ns: int) -> None:
        self.next_offset = 0
        self.retained = bytearray()
        self.retained_ts_ns = 0
        self.last_ts_ns = now_ns
        self.shed_ts_ns = -1  # >= 0 while shed: the kernel time shedding began


class FlowReassembler:
    """Turns each flow's samples into Chunk and gap calls on a consumer, within memory bounds.

    Accounted memory is the retained bytes: at most `per_flow_limit` per flow and `total_limit`
    over all flows, always (`buffered_bytes` tells the current total).
    """

    def __init__(self, per_flow_limit: int, total_limit: int) -> None:
        if per_flow_limit <= 0 or total_limit <= 0:
            raise ValueError("limits must be positive")
        self.per_flow_limit = per_flow_limit
        self.total_limit = total_limit
        self.stats = ReassemblyStats()
        self._flows: dict[int, _FlowStream] = {}
        self._buffered = 0

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    def flow_buffered(self, cookie: int) -> int:
        stream = self._flows.get(cookie)
        return len(stream.retained) if stream is not None else 0

    def __contains__(self, cookie: int) -> bool:
        return cookie in self._flows

    def __len__(self) -> int:
        return len(self._flows)

    def open(self, cookie: int, now_ns: int) -> None:
        """Start tracking a flow before its first sample (idleness counts from now_ns)."""
        if cookie not in self._flows:
            self._flows[cookie] = _FlowStream(now_ns)

    def push(self, sample: Sample, consumer: StreamConsumer) -> None:
        stream = self._flows.get(sample.cookie)
        if stream is None:
            stream = self._flows[sample.cookie] = _FlowStream(sample.ts_ns)
        stream.last_ts_ns = max(stream.last_ts_ns, sample.ts_ns)
        ts = sample.ts_ns
        expected = stream.next_offset
        data_end = sample.offset + len(sample.data)
        # A send never covers fewer bytes than it carried; trust the data if they disagree.
        msg_end = max(sample.end, data_end)

        if stream.shed_ts_ns >= 0:
            # The first sample after shedding: the hole up to it was shed, not lost.
            shed_ts, stream.shed_ts_ns = stream.shed_ts_ns, -1
            if sample.offset > expected:
                self._shed_gap(stream, consumer, sample.offset - expected, shed_ts)
                expected = sample.offset
        if sample.offset > expected:
            self._gap(stream, consumer, sample.offset - expected, GapCause.LOST, ts)
            expected = sample.offset
        if data_end > expected:
            skip = expected - sample.offset  # >0 when this sample overlaps bytes already seen
            if skip:
                self.stats.overlap_bytes += skip
            self._data(stream, consumer, memoryview(sample.data)[skip:], ts)
            expected = data_end
        elif data_end < expected and sample.data:
            self.stats.overlap_bytes += len(sample.data)
        if msg_end > expected:
            self._gap(stream, consumer, msg_end - expected, GapCause.TRUNCATED, ts)
            expected = msg_end
        stream.next_offset = max(stream.next_offset, expected)

    def shed(self, cookie: int, offset: int, ts_ns: int, consumer: StreamConsumer) -> None:
        """The kernel sheds the flow from stream offset `offset` (a message boundary) until its
        next sample. Bytes missing before `offset` were lost as usual; a shed record while
        already shedding (the next request shed too) changes nothing."""
        stream = self._flows.get(cookie)
        if stream is None:
            stream = self._flows[cookie] = _FlowStream(ts_ns)
        stream.last_ts_ns = max(stream.last_ts_ns, ts_ns)
        if stream.shed_ts_ns >= 0:
            return
        if offset > stream.next_offset:
            self._gap(stream, consumer, offset - stream.next_offset, GapCause.LOST, ts_ns)
            stream.next_offset = offset
        stream.shed_ts_ns = ts_ns

    def shedding(self, cookie: int) -> bool:
        stream = self._flows.get(cookie)
        return stream is not None and stream.shed_ts_ns >= 0

    def finish(self, cookie: int, final_offset: int, consumer: StreamConsumer, ts_ns: int) -> bool:
        """The flow ended having sent `final_offset` bytes in all: bytes past the last sample
        were lost (no later sample can reveal that gap), so report them as one. Returns whether
        the consumer has now seen the stream to its end, gaps included."""
        stream = self._flows.get(cookie)
        if stream is None:
            return False
        if final_offset > stream.next_offset:
            missing = final_offset - stream.next_offset
            if stream.shed_ts_ns >= 0:
                self._shed_gap(stream, consumer, missing, stream.shed_ts_ns)
            else:
                self._gap(stream, consumer, missing, GapCause.LOST, ts_ns)
            stream.next_offset = final_offset
        stream.shed_ts_ns = -1
        return True

    def close(self, cookie: int) -> None:
        """Forget a flow (it ended); its retained bytes are dropped unread."""
        stream = self._flows.pop(cookie, None)
        if stream is not None:
            self._buffered -= len(stream.retained)
            self.stats.flows_closed += 1

    def evict(self, cookie: int) -> None:
        """Forget a flow for idleness or pressure (counted as an eviction)."""
        stream = self._flows.pop(cookie, None)
        if stream is not None:
            self._buffered -= len(stream.retained)
            self.stats.evictions += 1

    def idle_flows(self, now_ns: int, idle_ns: int) -> list[int]:
        """Cookies of flows with no sample since now_ns - idle_ns (not evicted: the caller
        finishes their decoders first, then calls evict)."""
        limit = now_ns - idle_ns
        return [c for c, s in self._flows.items() if s.last_ts_ns < limit]

    # -- internals -------------------------------------------------------------------------

    def _data(
        self, stream: _FlowStream, consumer: StreamConsumer, new: memoryview, ts: int
    ) -> None:
        carried = len(stream.retained)
        if carried:
            if carried + len(new) > self.per_flow_limit or (
                self._buffered + len(new) > self.total_limit
            ):
                # Growing the retained tail would break a bound: give it up as lost bytes; the
                # consumer learns it is followed directly by `new` (a zero-length gap).
                self._strand(stream, consumer, 0, GapCause.OVER_LIMIT, ts)
                carried = 0
            else:
                # New objects rather than in-place resizes: a consumer that kept a view of the
                # old buffer must not be able to wedge this flow with BufferError.
                stream.retained = stream.retained + new
                self._buffered += len(new)
                taken = consumer.on_data(
                    Chunk(memoryview(stream.retained), ts, carried, stream.retained_ts_ns)
                )
                self._drop_front(stream, taken, carried, ts)
                return
        # Nothing retained: hand the sample's own bytes over without copying.
        taken = consumer.on_data(Chunk(new, ts))
        rest = new[taken:]
        if not rest:
            return
        if len(rest) > self.per_flow_limit or self._buffered + len(rest) > self.total_limit:
            self.stats.bytes_over_limit += len(rest)
            self.stats.gaps += 1
            self.stats.gap_bytes += len(rest)
            consumer.on_gap(rest, 0, GapCause.OVER_LIMIT, ts)
            return
        stream.retained = bytearray(rest)
        stream.retained_ts_ns = ts
        self._buffered += len(rest)

    def _drop_front(self, stream: _FlowStream, taken: int, carried: int, ts: int) -> None:
        if taken <= 0:
            return
        taken = min(taken, len(stream.retained))
        stream.retained = stream.retained[taken:]
        self._buffered -= taken
        if taken >= carried:
            # What is left began in the newest send.
            stream.retained_ts_ns = ts

    def _gap(
        self,
        stream: _FlowStream,
        consumer: StreamConsumer,
        length: int,
        cause: GapCause,
        ts: int,
    ) -> None:
        self.stats.gaps += 1
        self.stats.gap_bytes += length
        if cause is GapCause.TRUNCATED:
            self.stats.truncated_bytes += length
        elif cause is GapCause.LOST:
            self.stats.lost_bytes += length
        self._strand(stream, consumer, length, cause, ts)

    def _shed_gap(
        self, stream: _FlowStream, consumer: StreamConsumer, length: int, ts: int
    ) -> None:
        self.stats.shed_gaps += 1
        self.stats.shed_bytes += length
        self._strand(stream, consumer, length, GapCause.SHED, ts)

    def _strand(
        self,
        stream: _FlowStream,
        consumer: StreamConsumer,
        length: int,
        cause: GapCause,
        ts: int,
    ) -> None:
        stranded = bytes(stream.retained)
        if cause is GapCause.OVER_LIMIT:
            self.stats.bytes_over_limit += len(stranded)
            self.stats.gaps += 1
            self.stats.gap_bytes += len(stranded)
        self._buffered -= len(stream.retained)
        stream.retained = bytearray()
        consumer.on_gap(memoryview(stranded), length, cause, ts)
