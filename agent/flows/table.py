"""The one table of intercepted flows the agent knows of, from their FlowStart to their FlowEnd.

Keyed by socket cookie, and by connection (both ends of a TCP connection, when both are
intercepted): which pod a request belongs to, without a scan. Owned by the wire decoder
(agent/protocols/wire.py), which stamps each exchange with its connection's flows; read by the
pipeline. One thread (the ring reader) changes it.
"""

from __future__ import annotations

from infertap.agent.flows.records import ConnectionId, FlowInfo, Role


class FlowTable:
    __slots__ = ("_by_conn", "_flows")

    def __init__(self) -> None:
        self._flows: dict[int, FlowInfo] = {}  # cookie -> the FlowInfo of its FlowStart
        self._by_conn: dict[ConnectionId, dict[Role, FlowInfo]] = {}

    def __len__(self) -> int:
        return len(self._flows)

    def start(self, flow: FlowInfo) -> None:
        self._flows[flow.cookie] = flow
        self._by_conn.setdefault(flow.connection, {})[flow.role] = flow

    def get(self, cookie: int) -> FlowInfo | None:
        return self._flows.get(cookie)

    def set_cgroup(self, cookie: int, cgroup_id: int) -> None:
        """A FlowCgroup record: the cgroup became known after the flow started."""
        known = self._flows.get(cookie)
        if known is not None:  # the same object _by_conn holds
            known.cgroup_id = cgroup_id

    def end(self, cookie: int) -> FlowInfo | None:
        """Forget a flow; returns what was known of it."""
        flow = self._flows.pop(cookie, None)
        if flow is not None:
            ends = self._by_conn.get(flow.connection)
            if ends is not None and ends.get(flow.role) is flow:
                del ends[flow.role]
                if not ends:
                    del self._by_conn[flow.connection]
        return flow

    def ends(self, connection: ConnectionId) -> tuple[FlowInfo | None, FlowInfo | None]:
        """(client flow, server flow) of a connection, each None when not intercepted."""
        ends = self._by_conn.get(connection)
        if ends is None:
            return None, None
        return ends.get(Role.CLIENT), ends.get(Role.SERVER)
