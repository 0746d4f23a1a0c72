"""Give back the memory BCC's compiler used, once a unit's programs are loaded.

BCC compiles in-process with clang and LLVM. After a compile the agent keeps, for nothing:
  - the compiler's freed heap, which glibc holds on to (measured here: 66 MB of a 228 MB agent);
  - the pages of libLLVM and libclang-cpp the compile touched (83 MB), file-backed and clean.
malloc_trim returns the first to the kernel. madvise(MADV_PAGEOUT) asks the kernel to reclaim the
second now rather than under memory pressure; they are read back from the file by the next compile
(a later unit, a TLS start), which costs that compile a few milliseconds of page faults, nothing
else. Both are hints: a kernel or libc that refuses them leaves memory as it was, never an error.
"""

from __future__ import annotations

import ctypes as ct
import ctypes.util
import logging
from functools import cache

log = logging.getLogger(__name__)

MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now
# The compiler's shared libraries, by the names Debian gives them (libLLVM-14.so.1,
# libclang-cpp.so.14); only their file-backed mappings are paged out.
COMPILER_LIBRARIES = ("libLLVM", "libclang-cpp")


@cache
def _libc() -> ct.CDLL:
    libc = ct.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ct.c_void_p, ct.c_size_t, ct.c_int]
    libc.madvise.restype = ct.c_int
    libc.malloc_trim.argtypes = [ct.c_size_t]
    libc.malloc_trim.restype = ct.c_int
    return libc


def compiler_mappings(maps_text: str) -> list[tuple[int, int]]:
    """(start, end) of every mapping of a compiler library in /proc/<pid>/maps text."""
    ranges = []
    for line in maps_text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6:
            continue  # anonymous: nothing to page out to a file
        name = fields[5].rsplit("/", 1)[-1]
        if name.startswith(COMPILER_LIBRARIES):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def release_compiler_memory() -> int:
    """Trim the heap and page out the compiler's libraries; returns the mappings paged out."""
    libc = _libc()
    libc.malloc_trim(0)
    try:
        with open("/proc/self/maps") as f:
            ranges = compiler_mappings(f.read())
    except OSError as exc:  # no /proc: nothing to page out
        log.debug("cannot read /proc/self/maps: %s", exc)
        return 0
    paged = 0
    for start, end in ranges:
        if libc.madvise(start, end - start, MADV_PAGEOUT) == 0:
            paged += 1
    return paged
