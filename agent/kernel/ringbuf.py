"""Batched reader for a BPF ring buffer, mapped into our memory directly.

BCC's ring buffer API calls a Python function through ctypes for every record (about 80k
records/s here). We map the ring ourselves and walk all available records in one pass, handing
out (memoryview) slices, so the cost per record is a little slicing and struct unpacking.

Layout (kernel/bpf/ringbuf.c): page 0 holds the consumer position (we write it); page 1 the
producer position; then the data area, mapped twice back to back so a record that wraps around
the end reads as contiguous memory. Each record has an 8-byte header: u32 length with the BUSY
(bit 31) and DISCARD (bit 30) flags, and u32 page offset; records are 8-byte aligned.
"""

from __future__ import annotations

import ctypes as ct
import ctypes.util
import mmap
import os
import select
from collections.abc import Callable
from functools import cache

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8
# The system's page size, for the ring's size (Sensor.ring_size: BPF_RINGBUF_OUTPUT counts pages)
# and for its mappings here: one value for both.
PAGE_SIZE = mmap.PAGESIZE
_PROT_READ = 0x1
_PROT_WRITE = 0x2
_MAP_SHARED = 0x01
_MAP_FAILED = ct.c_void_p(-1).value


@cache
def _libc() -> ct.CDLL:
    libc = ct.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mmap.restype = ct.c_void_p
    libc.mmap.argtypes = [ct.c_void_p, ct.c_size_t, ct.c_int, ct.c_int, ct.c_int, ct.c_long]
    libc.munmap.argtypes = [ct.c_void_p, ct.c_size_t]
    return libc


def _mmap(length: int, prot: int, fd: int, offset: int) -> int:
    addr = _libc().mmap(None, length, prot, _MAP_SHARED, fd, offset)
    if addr is None or addr == _MAP_FAILED:
        err = ct.get_errno()
        raise OSError(err, f"mmap ring buffer: {os.strerror(err)}")
    return int(addr)


class RingFill:
    """How full a ring is, for a process that does not read it (the agent, whose inspection
    workers drain their rings): only the two position pages are mapped, read-only."""

    def __init__(self, map_fd: int, size: int) -> None:
        self._page = PAGE_SIZE
        self.size = size
        self._cons_addr = _mmap(self._page, _PROT_READ, map_fd, 0)
        self._prod_addr = _mmap(self._page, _PROT_READ, map_fd, self._page)
        self._cons = ct.c_uint64.from_address(self._cons_addr)
        self._prod = ct.c_uint64.from_address(self._prod_addr)
        self._closed = False

    @property
    def fill(self) -> float:
        """Bytes waiting for the reader, as a share of the ring."""
        return int(self._prod.value - self._cons.value) / self.size

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _libc().munmap(self._prod_addr, self._page)
            _libc().munmap(self._cons_addr, self._page)


class RingReader:
    """Consume records from a BPF_MAP_TYPE_RINGBUF map fd of `size` bytes (a power of two)."""

    def __init__(self, map_fd: int, size: int) -> None:
        self._page = PAGE_SIZE
        self._size = size
        self._mask = size - 1
        self._cons_addr = _mmap(self._page, _PROT_READ | _PROT_WRITE, map_fd, 0)
        self._prod_len = self._page + 2 * size
        self._prod_addr = _mmap(self._prod_len, _PROT_READ, map_fd, self._page)
        self._cons = ct.c_uint64.from_address(self._cons_addr)
        self._prod = ct.c_uint64.from_address(self._prod_addr)
        # A view over the (doubly mapped) data area: slices never need to handle wrap-around.
        area = (ct.c_char * (2 * size)).from_address(self._prod_addr + self._page)
        self._data = memoryview(area).cast("B")
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)
        self._closed = False

    @property
    def size(self) -> int:
        """The data area's size in bytes: pending_bytes / size is the ring's fill."""
        return self._size

    @property
    def pending_bytes(self) -> int:
        return int(self._prod.value - self._cons.value)

    def wait(self, timeout_s: float) -> bool:
        """Block until the kernel signals new data or the timeout passes."""
        if self.pending_bytes:
            return True
        return bool(self._epoll.poll(timeout_s))

    def drain(self, handle: Callable[[memoryview], None], limit: int = 1 << 30) -> int:
        """Hand every committed record to `handle` (the view is only valid during the call).

        Returns the number of records handed out. The consumer position is published once at
        the end of the batch, which frees the ring space for the kernel.
        """
        cons = self._cons.value
        prod = self._prod.value
        data = self._data
        mask = self._mask
        n = 0
        while cons < prod and n < limit:
            pos = cons & mask
            hdr = int.from_bytes(data[pos : pos + 4], "little")
            if hdr & _BUSY:
                break  # reserved but not yet submitted: everything after it waits too
            length = hdr & ~(_BUSY | _DISCARD) & 0xFFFFFFFF
            if not hdr & _DISCARD:
                start = pos + _HDR
                handle(data[start : start + length])
                n += 1
            cons += (length + _HDR + 7) & ~7
        self._cons.value = cons
        return n

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._epoll.close()
        self._data.release()
        _libc().munmap(self._prod_addr, self._prod_len)
        _libc().munmap(self._cons_addr, self._page)

    def __enter__(self) -> RingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
