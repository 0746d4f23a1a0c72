"""Which mappings release_compiler_memory pages out (agent/kernel/compiler_memory.py)."""

from __future__ import annotations

from infertap.agent.kernel.compiler_memory import compiler_mappings, release_compiler_memory

MAPS = """\
55d0c0000000-55d0c0100000 r-xp 00000000 fe:01 123 /usr/bin/python3.11
7f0000000000-7f0004000000 r-xp 00000000 fe:01 456 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
7f0004000000-7f0004100000 rw-p 04000000 fe:01 456 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
7f0005000000-7f0006000000 r-xp 00000000 fe:01 789 /usr/lib/llvm-14/lib/libclang-cpp.so.14
7f0007000000-7f0007100000 rw-p 00000000 00:00 0
7f0008000000-7f0008100000 r--p 00000000 fe:01 999 /opt/notlibLLVM/libfoo.so
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
"""


def test_only_the_compilers_libraries_are_chosen() -> None:
    assert compiler_mappings(MAPS) == [
        (0x7F0000000000, 0x7F0004000000),
        (0x7F0004000000, 0x7F0004100000),
        (0x7F0005000000, 0x7F0006000000),
    ]


def test_every_compiler_mapping_of_this_process_is_paged_out() -> None:
    # None when this process has not imported bcc, some when kernel tests ran here first: each
    # one the kernel accepted the hint for, and nothing fails either way.
    with open("/proc/self/maps") as f:
        present = len(compiler_mappings(f.read()))
    assert release_compiler_memory() == present
