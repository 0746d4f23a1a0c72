"""Reading the kernel's TCP tables (/proc/net/tcp, tcp6) for connections opened before the
agent attached: addresses in the kernel's word order, states, inodes; and a real socket of this
process found in its own table."""

from __future__ import annotations

import os
import socket

from infertap.agent.discovery.open_sockets import parse_tcp_table, tcp_table
from infertap.agent.flows.records import Endpoint

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid inode\n"
REST = " 00000000:00000000 00:00000000 00000000     0        0 {inode} 1 0000 100 0 0 10 0\n"
TCP = (
    HEADER
    + "   0: 0100007F:C80D 00000000:0000 0A"
    + REST.format(inode=150785)
    + "   1: 0501010A:1F90 0901010A:A028 01"
    + REST.format(inode=4242)
)
V4_MAPPED = "0000000000000000FFFF00000100007F"
V6_LOOPBACK = "00000000000000000000000001000000"
TCP6 = (
    HEADER
    + f"   0: {V4_MAPPED}:B0F0 {V4_MAPPED}:9B47 01"
    + REST.format(inode=77)
    + f"   1: {V6_LOOPBACK}:1F90 {V6_LOOPBACK}:D431 01"
    + REST.format(inode=78)
)


def test_tables_parse_to_addresses_states_and_inodes() -> None:
    listen, est = parse_tcp_table(TCP)
    assert (listen.local, listen.state, listen.inode) == (
        Endpoint("127.0.0.1", 51213),
        "0A",
        150785,
    )
    assert (est.local, est.remote, est.state) == (
        Endpoint("10.1.1.5", 8080),
        Endpoint("10.1.1.9", 41000),
        "01",
    )
    mapped, v6 = parse_tcp_table(TCP6)
    assert mapped.local == Endpoint("127.0.0.1", 45296)  # IPv4-mapped: shown as IPv4
    assert v6.local == Endpoint("::1", 8080) and v6.remote.port == 54321 and v6.inode == 78


def test_a_real_connection_of_this_process_is_in_its_table() -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as c:
            inode = os.fstat(c.fileno()).st_ino
            rows = {r.inode: r for r in tcp_table(os.getpid())}
            assert rows[inode].state == "01" and rows[inode].remote == Endpoint("127.0.0.1", port)
