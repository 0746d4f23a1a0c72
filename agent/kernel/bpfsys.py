"""The few BPF syscalls BCC does not wrap: query, identify and detach programs on a cgroup;
create the extra ring buffers of inspection workers and put them in a map of maps.

We call Debian's libbpf (a dependency of python3-bpfcc) through ctypes. These are what lets a new
agent find and remove programs that a killed instance left attached (BPF_PROG_ATTACH has no link
that dies with the process), and what tests use to check the kernel's view, not ours.
"""

from __future__ import annotations

import ctypes as ct
import ctypes.util
import enum
import os
from dataclasses import dataclass
from functools import cache

# enum bpf_attach_type (uapi/linux/bpf.h)


class AttachType(enum.IntEnum):
    CGROUP_INET_EGRESS = 1
    CGROUP_SOCK_OPS = 3
    SK_MSG_VERDICT = 7
    CGROUP_INET4_CONNECT = 10
    CGROUP_INET6_CONNECT = 11
    CGROUP_GETSOCKOPT = 21


BPF_F_ALLOW_MULTI = 2
BPF_MAP_TYPE_RINGBUF = 27  # enum bpf_map_type
_PROG_NAME_OFFSET = 64  # offsetof(struct bpf_prog_info, name)
_PROG_INFO_LEN = 80  # up to and including name[16]; the kernel copies what we ask for


class BpfError(OSError):
    pass


@cache
def _lib() -> ct.CDLL:
    path = ctypes.util.find_library("bpf") or "libbpf.so.1"
    lib = ct.CDLL(path, use_errno=True)
    lib.bpf_prog_query.argtypes = [
        ct.c_int,
        ct.c_int,
        ct.c_uint32,
        ct.POINTER(ct.c_uint32),
        ct.POINTER(ct.c_uint32),
        ct.POINTER(ct.c_uint32),
    ]
    lib.bpf_prog_get_fd_by_id.argtypes = [ct.c_uint32]
    lib.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
    lib.bpf_prog_detach2.argtypes = [ct.c_int, ct.c_int, ct.c_int]
    lib.bpf_map_update_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]
    lib.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_void_p]
    lib.bpf_map_get_next_key.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
    lib.bpf_map_create.argtypes = [
        ct.c_int,
        ct.c_char_p,
        ct.c_uint32,
        ct.c_uint32,
        ct.c_uint32,
        ct.c_void_p,
    ]
    return lib


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ct.get_errno() or -ret
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ret


@dataclass(frozen=True)
class ProgInfo:
    id: int
    name: str


def prog_info(prog_fd: int) -> ProgInfo:
    buf = ct.create_string_buffer(_PROG_INFO_LEN)
    length = ct.c_uint32(_PROG_INFO_LEN)
    _check(_lib().bpf_obj_get_info_by_fd(prog_fd, buf, ct.byref(length)), "prog info")
    prog_id = int.from_bytes(buf.raw[4:8], "little")
    name = buf.raw[_PROG_NAME_OFFSET : _PROG_NAME_OFFSET + 16].split(b"\0", 1)[0]
    return ProgInfo(id=prog_id, name=name.decode(errors="replace"))


def prog_info_by_id(prog_id: int) -> ProgInfo | None:
    """None when the program no longer exists."""
    fd = _lib().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return None
    try:
        return prog_info(fd)
    finally:
        os.close(fd)


def query_cgroup(cgroup_path: str, attach_type: AttachType) -> list[int]:
    """Ids of the programs attached directly to a cgroup for one attach type."""
    fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ids = (ct.c_uint32 * 64)()
        count = ct.c_uint32(64)
        flags = ct.c_uint32(0)
        _check(
            _lib().bpf_prog_query(fd, int(attach_type), 0, ct.byref(flags), ids, ct.byref(count)),
            f"query {cgroup_path}",
        )
        return [ids[i] for i in range(count.value)]
    finally:
        os.close(fd)


def detach_by_id(cgroup_path: str, attach_type: AttachType, prog_id: int) -> bool:
    """Detach one program from a cgroup. False if it was already gone."""
    prog_fd = _lib().bpf_prog_get_fd_by_id(prog_id)
    if prog_fd < 0:
        return False
    cg_fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ret = _lib().bpf_prog_detach2(prog_fd, cg_fd, int(attach_type))
        if ret < 0 and ct.get_errno() == 2:  # ENOENT: not attached there (anymore)
            return False
        _check(ret, f"detach {prog_id} from {cgroup_path}")
        return True
    finally:
        os.close(cg_fd)
        os.close(prog_fd)


def map_delete(map_fd: int, key: ct.Structure) -> bool:
    """False if the key was not there."""
    ret = _lib().bpf_map_delete_elem(map_fd, ct.byref(key))
    if ret < 0 and ct.get_errno() == 2:
        return False
    _check(ret, "map delete")
    return True


def sockhash_insert(map_fd: int, key: ct.Structure, sock_fd: int) -> None:
    """Put a socket (by our descriptor for it) into a sockhash under `key`."""
    value = ct.c_uint32(sock_fd)
    _check(_lib().bpf_map_update_elem(map_fd, ct.byref(key), ct.byref(value), 0), "sockhash insert")


def map_keys(map_fd: int, key_type: type[ct.Structure]) -> list[bytes]:
    """Every key of a map, as raw bytes (works for sockhashes, whose values cannot be read)."""
    keys: list[bytes] = []
    prev: ct.Structure | None = None
    while True:
        nxt = key_type()
        ret = _lib().bpf_map_get_next_key(
            map_fd, None if prev is None else ct.byref(prev), ct.byref(nxt)
        )
        if ret < 0:
            if ct.get_errno() == 2:  # ENOENT: no more keys
                return keys
            _check(ret, "map get next key")
        keys.append(bytes(nxt))
        prev = nxt


def ringbuf_create(name: str, size: int) -> int:
    """A new BPF ring buffer of `size` bytes (a power-of-two multiple of the page size); returns
    its descriptor, which the caller owns."""
    fd = _lib().bpf_map_create(BPF_MAP_TYPE_RINGBUF, name.encode()[:15], 0, 0, size, None)
    return _check(fd, f"create ring buffer {name}")


def map_set_fd(map_fd: int, index: int, value_fd: int) -> None:
    """Put a map (by its descriptor) at `index` of an array of maps."""
    key = ct.c_uint32(index)
    value = ct.c_uint32(value_fd)
    _check(_lib().bpf_map_update_elem(map_fd, ct.byref(key), ct.byref(value), 0), "map of maps set")
