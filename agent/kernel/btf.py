"""Read one struct member's offset from the running kernel's BTF (/sys/kernel/btf/vmlinux).

BCC compiles against whatever headers exist (often older than the kernel, see headers.py) and has
no CO-RE relocations, so a kernel struct field read through headers can sit at the wrong offset.
For the few fields we read (tcp_sock.write_seq), we take the offset from the kernel's own type
information at start-up and pass it to the compiler as a constant: a hand-made CO-RE for one field.
"""

from __future__ import annotations

import struct
from pathlib import Path

from infertap.agent.errors import InfertapError

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
_MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type_off/len, str_off/len
_TYPE = struct.Struct("<III")  # name_off, info, size_or_type
_MEMBER = struct.Struct("<III")  # name_off, type, offset

# Bytes of kind-specific data after each btf_type, per kind; vlen-sized kinds are multiplied.
_KIND_STRUCT, _KIND_UNION = 4, 5
_FIXED_EXTRA = {1: 4, 3: 12, 14: 4, 17: 4}  # INT, ARRAY, VAR, DECL_TAG
_PER_VLEN = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}  # STRUCT, UNION, ENUM, FUNC_PROTO,
# DATASEC, ENUM64


class BtfError(InfertapError, RuntimeError):
    pass


def member_offset(struct_name: str, member: str, path: Path = VMLINUX_BTF) -> int:
    """Byte offset of `member` in `struct struct_name`, as the running kernel lays it out."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BtfError(f"cannot read kernel BTF at {path}: {exc.strerror}") from exc
    magic, _ver, _flags, hdr_len, type_off, type_len, str_off, _str_len = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise BtfError(f"{path} is not BTF")
    types = hdr_len + type_off
    strings = hdr_len + str_off
    want_struct = struct_name.encode()
    want_member = member.encode()

    def name_at(off: int) -> bytes:
        start = strings + off
        return data[start : data.index(b"\0", start)]

    pos, end = types, types + type_len
    while pos < end:
        name_off, info, _size = _TYPE.unpack_from(data, pos)
        kind = (info >> 24) & 0x1F
        vlen = info & 0xFFFF
        kind_flag = info >> 31
        body = pos + _TYPE.size
        if kind == _KIND_STRUCT and name_off and name_at(name_off) == want_struct:
            for i in range(vlen):
                m_name, _m_type, m_off = _MEMBER.unpack_from(data, body + 12 * i)
                if name_at(m_name) == want_member:
                    bits = m_off & 0xFFFFFF if kind_flag else m_off
                    if bits % 8:
                        raise BtfError(f"{struct_name}.{member} is a bitfield")
                    return int(bits) // 8
            raise BtfError(f"struct {struct_name} has no member {member}")
        pos = body + _FIXED_EXTRA.get(kind, 0) + _PER_VLEN.get(kind, 0) * vlen
    raise BtfError(f"struct {struct_name} not found in {path}")
