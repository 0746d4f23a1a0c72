"""FlowReassembler: samples become contiguous chunks and exact gaps, in bounded memory."""

from __future__ import annotations

from dataclasses import dataclass, field

from infertap.agent.flows.reassembly import Chunk, FlowReassembler, GapCause
from infertap.agent.flows.records import Role, Sample


@dataclass
class Recorder:
    """A consumer that takes everything, or declines the last `keep` bytes of every offer."""

    keep: int = 0
    never_take: bool = False
    events: list[tuple[str, object]] = field(default_factory=list)
    stream: bytearray = field(default_factory=bytearray)

    def on_data(self, chunk: Chunk) -> int:
        data = bytes(chunk.data)
        self.events.append(("data", (data, chunk.ts_ns, chunk.carried, chunk.carried_ts_ns)))
        if self.never_take:
            return 0
        take = max(0, len(data) - self.keep)
        self.stream += data[:take]
        return take

    def on_gap(self, stranded: memoryview, length: int, cause: GapCause, ts_ns: int) -> None:
        self.events.append(("gap", (bytes(stranded), length, cause)))


def sample(
    offset: int, data: bytes, msg_len: int | None = None, ts: int = 1, cookie: int = 1
) -> Sample:
    n = len(data) if msg_len is None else msg_len
    return Sample(cookie, ts, offset, n, data, Role.CLIENT, truncated=n > len(data))


def test_contiguous_samples_reach_the_consumer_whole_and_in_order() -> None:
    r = FlowReassembler(1024, 4096)
    rec = Recorder()
    r.push(sample(0, b"GET / HT"), rec)
    r.push(sample(8, b"TP/1.1\r\n"), rec)
    assert bytes(rec.stream) == b"GET / HTTP/1.1\r\n"
    assert [e[0] for e in rec.events] == ["data", "data"]
    assert r.stats.gaps == 0 and r.buffered_bytes == 0


def test_truncated_send_becomes_a_gap_of_exactly_the_missing_bytes() -> None:
    r = FlowReassembler(1024, 4096)
    rec = Recorder()
    r.push(sample(0, b"abcd", msg_len=10_000), rec)
    r.push(sample(10_000, b"next"), rec)
    assert rec.events[1] == ("gap", (b"", 9_996, GapCause.TRUNCATED))
    assert rec.events[2][0] == "data"
    assert r.stats.truncated_bytes == 9_996 and r.stats.lost_bytes == 0
    assert bytes(rec.stream) == b"abcdnext"


def test_lost_samples_become_a_gap_of_exactly_the_skipped_offsets() -> None:
    r = FlowReassembler(1024, 4096)
    rec = Recorder()
    r.push(sample(0, b"abc"), rec)
    r.push(sample(503, b"xyz"), rec)
    assert rec.events[1] == ("gap", (b"", 500, GapCause.LOST))
    assert r.stats.lost_bytes == 500 and r.stats.gaps == 1


def test_first_sample_past_offset_zero_is_a_gap_from_the_stream_start() -> None:
    r = FlowReassembler(1024, 4096)
    rec = Recorder()
    r.push(sample(42, b"tail"), rec)
    assert rec.events[0] == ("gap", (b"", 42, GapCause.LOST))


def test_overlapping_and_duplicate_samples_are_trimmed() -> None:
    r = FlowReassembler(1024, 4096)
    rec = Recorder()
    r.push(sample(0, b"abcdef"), rec)
    r.push(sample(4, b"efgh"), rec)  # overlaps two bytes
    r.push(sample(0, b"abc"), rec)  # a duplicate
    assert bytes(rec.stream) == b"abcdefgh"
    assert r.stats.overlap_bytes == 2 + 3
    assert r.stats.gaps == 0


def test_declined_bytes_are_offered_again_with_their_own_send_time() -> None:
    r = FlowReassembler(1024, 4096)
    rec = Recorder(keep=3)
    r.push(sample(0, b"hello", ts=10), rec)
    assert r.buffered_bytes == 3 and r.flow_buffered(1) == 3
    rec.keep = 0
    r.push(sample(5, b"world", ts=20), rec)
    assert rec.events[1] == ("data", (b"lloworld", 20, 3, 10))
    assert bytes(rec.stream) == b"helloworld"
    assert r.buffered_bytes == 0


def test_declined_bytes_are_stranded_at_a_gap() -> None:
    r = FlowReassembler(1024, 4096)
    rec = Recorder(keep=4)
    r.push(sample(0, b"abcdefgh", msg_len=100), rec)
    assert rec.events[-1] == ("gap", (b"efgh", 92, GapCause.TRUNCATED))
    assert r.buffered_bytes == 0


def test_chunk_ts_at_tells_retained_from_new_bytes() -> None:
    chunk = Chunk(memoryview(b"abcdef"), ts_ns=20, carried=2, carried_ts_ns=10)
    assert [chunk.ts_at(i) for i in range(6)] == [10, 10, 20, 20, 20, 20]


def test_per_flow_limit_is_never_exceeded_and_overflow_is_counted() -> None:
    r = FlowReassembler(per_flow_limit=100, total_limit=10_000)
    rec = Recorder(never_take=True)
    for i in range(10):
        r.push(sample(i * 30, b"x" * 30), rec)
        assert r.flow_buffered(1) <= 100
    overflow = [e for e in rec.events if e[0] == "gap"]
    assert overflow and all(e[1][2] is GapCause.OVER_LIMIT for e in overflow)  # type: ignore[index]
    assert r.stats.bytes_over_limit == 300 - r.flow_buffered(1)


def test_total_limit_holds_across_flows() -> None:
    r = FlowReassembler(per_flow_limit=1000, total_limit=250)
    rec = Recorder(never_take=True)
    for cookie in range(1, 6):
        r.push(sample(0, b"y" * 100, cookie=cookie), rec)
        assert r.buffered_bytes <= 250
    assert r.buffered_bytes == 200
    assert r.stats.bytes_over_limit == 300


def test_close_and_evict_release_memory_and_count() -> None:
    r = FlowReassembler(1000, 10_000)
    rec = Recorder(never_take=True)
    r.push(sample(0, b"a" * 50, ts=100, cookie=1), rec)
    r.push(sample(0, b"b" * 70, ts=900, cookie=2), rec)
    assert r.buffered_bytes == 120
    assert r.idle_flows(now_ns=1000, idle_ns=500) == [1]
    r.evict(1)
    r.close(2)
    assert r.buffered_bytes == 0 and len(r) == 0
    assert r.stats.evictions == 1 and r.stats.flows_closed == 1
