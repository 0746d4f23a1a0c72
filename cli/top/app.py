"""`infertap top`: the live terminal view, a Textual app that draws what TopState folds.

Layout: a header line, the models panel, then drift, PII, flows and verdicts panels, a status
line and the key bar. On a small terminal (under WIDE_COLS x WIDE_ROWS, e.g. 80x24 over ssh) it
shows the models panel and one other panel at a time (keys 2-5) with fewer columns.

Data is fetched on a worker thread once per refresh so a slow agent never freezes the keys;
tables are updated cell by cell when their rows stay the same, which keeps the cursor and avoids
redrawing (no flicker).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Final

import grpc
from rich.console import Console
from rich.text import Text
from textual import events
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Vertical
from textual.widgets import DataTable, Footer, Input, Static
from textual.widgets.data_table import CellDoesNotExist

from infertap.agent.api import infertap_pb2 as pb
from infertap.cli.top.source import TopSource, rpc_details
from infertap.cli.top.state import (
    MODEL_SORTS,
    WINDOW_S,
    Snapshot,
    TopState,
    drift_level,
    sparkline,
    split_hostport,
)

WIDE_COLS: Final = 120
WIDE_ROWS: Final = 32
DETAIL_PANELS: Final = ("drift", "pii", "flows", "verdicts")

CIRCUIT_STYLE: Final = {"closed": "green", "half-open": "yellow", "open": "bold red"}
LEVEL_STYLE: Final = {"ok": "", "warn": "yellow", "alert": "bold red"}

Columns = Sequence[tuple[str, str]]  # (key, label)
Rows = Sequence[tuple[str, Sequence[Text | str]]]  # (row key, cells)


def sync_table(table: DataTable[Any], columns: Columns, rows: Rows) -> None:
    """Show `rows` in `table`: in place when the same rows are there, else rebuilt with the
    cursor kept on the same row key (so a selected service stays selected as rows move)."""
    if [c.value for c in table.columns] != [k for k, _ in columns]:
        table.clear(columns=True)
        for key, label in columns:
            table.add_column(label, key=key)
    if [r.key.value for r in table.ordered_rows] == [k for k, _ in rows]:
        for key, cells in rows:
            for (col, _), cell in zip(columns, cells, strict=True):
                table.update_cell(key, col, cell, update_width=True)
        return
    selected = selected_key(table)
    table.clear()
    for key, cells in rows:
        table.add_row(*cells, key=key)
    keys = [k for k, _ in rows]
    if selected in keys:
        table.move_cursor(row=keys.index(selected), animate=False)


def selected_key(table: DataTable[Any]) -> str | None:
    if not table.row_count:
        return None
    try:
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
    except CellDoesNotExist:
        return None


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _stat(stat: str, v: float | None) -> Text:
    return Text("-" if v is None else f"{v:.3f}", style=LEVEL_STYLE[drift_level(stat, v)])


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "K", "M", "G"):
        if size < 1024 or unit == "G":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _age(ns: int) -> str:
    s = max(0, ns) / 1e9
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.0f}h"


def _short_protocol(protocol: str) -> str:
    """ "kserve-v2-grpc" -> "grpc", "kserve-v2-rest" -> "rest", "openai" -> "openai"."""
    return protocol.rsplit("-", 1)[-1] or "-"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _clip_left(text: str, width: int) -> str:
    """For cgroup paths: the pod and container are at the end."""
    return text if len(text) <= width else "…" + text[-(width - 1) :]


class TopApp(App[None]):
    TITLE = "infertap top"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    Screen { layout: vertical; }
    #header { height: 1; background: $boost; padding: 0 1; }
    #filter { display: none; height: 1; border: none; padding: 0 1; }
    #filter.-shown { display: block; }
    #status { height: 1; padding: 0 1; color: $text-muted; }
    #panels { grid-size: 2; grid-rows: 1fr 1fr 1fr; height: 1fr; }
    .panel { border: round $panel-lighten-2; height: 1fr; }
    .panel:focus-within { border: round $accent; }
    #models-panel { column-span: 2; }
    DataTable { height: 1fr; }
    #pii-summary { height: 1; }
    #pii-counts { height: auto; max-height: 6; }
    Screen.-compact #panels { grid-size: 1; grid-rows: 2fr 3fr; }
    Screen.-compact #models-panel { column-span: 1; }
    Screen.-compact .panel { border: none; border-top: solid $panel-lighten-2; }
    Screen.-compact .panel:focus-within { border: none; border-top: solid $accent; }
    Screen.-compact .detail { display: none; }
    Screen.-compact .detail.-current { display: block; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "quit"),
        Binding("slash", "filter", "filter"),
        Binding("s", "sort", "sort"),
        Binding("b", "ask('block')", "block"),
        Binding("u", "ask('unblock')", "unblock"),
        Binding("y", "confirm", "yes", show=False),
        Binding("n", "cancel", "no", show=False),
        Binding("escape", "escape", "back", show=False),
        Binding("1", "panel('models')", "models", show=False),
        Binding("2", "panel('drift')", "drift"),
        Binding("3", "panel('pii')", "pii"),
        Binding("4", "panel('flows')", "flows"),
        Binding("5", "panel('verdicts')", "verdicts"),
    ]

    def __init__(
        self, source: TopSource, refresh_s: float = 1.0, state: TopState | None = None
    ) -> None:
        super().__init__()
        self.source = source
        self.refresh_s = refresh_s
        self.state = state if state is not None else TopState()
        self.sort = "name"
        self.filter_text = ""
        self.detail = "pii"
        self.compact = False
        self.message = "connecting…"
        self.agent_error = ""
        self._pending: tuple[str, pb.Target, str] | None = None
        self._polling = False

    # -- layout --

    def compose(self) -> ComposeResult:
        yield Static(id="header")
        yield Input(placeholder="filter: model, service, feature…", id="filter")
        with Grid(id="panels"):
            with Vertical(id="models-panel", classes="panel"):
                yield DataTable(id="models", cursor_type="row")
            with Vertical(id="drift-panel", classes="panel detail"):
                yield DataTable(id="drift", cursor_type="row")
            with Vertical(id="pii-panel", classes="panel detail"):
                yield Static(id="pii-summary")
                yield DataTable(id="pii-counts", cursor_type="row")
                yield DataTable(id="pii-recent", cursor_type="row")
            with Vertical(id="flows-panel", classes="panel detail"):
                yield DataTable(id="flows", cursor_type="row")
            with Vertical(id="verdicts-panel", classes="panel detail"):
                yield DataTable(id="verdicts", cursor_type="row")
        yield Static(id="status")
        # Compact keys and no command palette: all keys fit on one line of an 80-column terminal.
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        self._layout_for(self.size.width, self.size.height)
        self.query_one("#models", DataTable).focus()
        self._render_all()
        self._tick()
        self.set_interval(self.refresh_s, self._tick)

    def on_resize(self, event: events.Resize) -> None:
        self._layout_for(event.size.width, event.size.height)
        self._render_all()

    def _layout_for(self, width: int, height: int) -> None:
        self.compact = width < WIDE_COLS or height < WIDE_ROWS
        self.screen.set_class(self.compact, "-compact")
        for name in DETAIL_PANELS:
            self.query_one(f"#{name}-panel").set_class(name == self.detail, "-current")

    # -- data --

    def _tick(self) -> None:
        if self._polling:
            return  # the last fetch is still waiting on the agent
        self._polling = True
        self.run_worker(self._fetch, thread=True, group="poll")

    def _fetch(self) -> None:
        events_ = self.source.events()
        snap: Snapshot | None = None
        error = ""
        try:
            snap = self.source.snapshot()
        except grpc.RpcError as exc:
            error = rpc_details(exc)
        self._deliver(self._absorb, events_, snap, error)

    def _deliver(self, callback: Callable[..., None], *args: Any) -> None:
        # RuntimeError: `q` was pressed while the agent was answering; nobody is left to show it.
        with contextlib.suppress(RuntimeError):
            self.call_from_thread(callback, *args)

    def _absorb(self, events_: list[pb.Event], snap: Snapshot | None, error: str) -> None:
        self._polling = False
        self.state.apply_events(events_)
        if snap is not None:
            self.state.apply_snapshot(snap)
        self.agent_error = error or self.source.problem()
        if self.message == "connecting…":
            self.message = ""
        self._render_all()

    # -- drawing --

    def _render_all(self) -> None:
        self._render_header()
        self._render_models()
        self._render_drift()
        self._render_pii()
        self._render_flows()
        self._render_verdicts()
        self._render_status()

    def _render_header(self) -> None:
        st = self.state.status
        parts = ["infertap top"]
        if st is not None:
            parts.append(f"{st.version} {'ready' if st.ready else 'starting'} {st.mode}")
        if not self.compact:  # the panels show these too; on 80 columns the filter matters more
            parts.append(f"{len(self.state.models)} models")
            parts.append(f"{len(self.state.flows)} flows")
        parts.append(f"sort {self.sort}")
        if self.filter_text:
            parts.append(f"filter {self.filter_text!r}")
        if st is not None:  # what was not decoded or not seen (`infertap status` has the detail)
            lost = sum(st.decode_lost.values())
            unseen = sum(st.connections_uninspected.values())
            if lost:
                parts.append(f"decode lost {lost}")
            if unseen:
                parts.append(f"{unseen} conns not inspected")
            skipped = sum(st.inspection_skipped.values())
            if skipped or any(st.shed_levels):
                shed = max(st.shed_levels, default=0)
                parts.append(f"skipped {skipped} (shedding {shed}%)")
        if not self.compact and self.state.policy_hash:
            parts.append(f"policy {self.state.policy_hash[:12]}")
        self.query_one("#header", Static).update(Text(" · ".join(parts), no_wrap=True))

    def _render_models(self) -> None:
        rows = self.state.model_rows(self.filter_text, self.sort)
        cols: list[tuple[str, str]] = [("model", "model")]
        if self.compact:  # one row per model and protocol: say which, briefly
            cols += [("via", "via")]
        else:
            cols += [("proto", "proto"), ("calls", "calls")]
        cols += [
            ("rate", "req/s"),
            ("p50", "p50 ms"),
            ("p99", "p99 ms"),
            ("err", "err%"),
            ("circuit", "circuit"),
            ("service", "service"),
        ]
        out = []
        for r in rows:
            err = "-" if r.error_rate is None else f"{100 * r.error_rate:.0f}"
            cells: list[Text | str] = [_clip(r.name, 16 if self.compact else 32)]
            if self.compact:
                cells += [_short_protocol(r.protocol)]
            else:
                cells += [r.protocol, str(r.total)]
            cells += [
                f"{r.rate:.1f}",
                _ms(r.p50_ms),
                _ms(r.p99_ms),
                Text(err, style="red" if (r.error_rate or 0) > 0 else ""),
                Text(r.circuit, style=CIRCUIT_STYLE.get(r.circuit, "")),
                r.service,
            ]
            out.append((f"{r.name}\0{r.protocol}", cells))
        self._sync("models", cols, out)
        self.query_one(
            "#models-panel"
        ).border_title = f"models · last {WINDOW_S:.0f}s · sort {self.sort}"

    def _render_drift(self) -> None:
        cols = [
            ("model", "model"),
            ("feature", "feature"),
            ("psi", "psi"),
            ("ks", "ks"),
            ("js", "js"),
            ("trend", "trend"),
        ]
        out = []
        for r in self.state.drift_rows(self.filter_text):
            style = LEVEL_STYLE[drift_level(r.trend_stat, r.trend[-1] if r.trend else None)]
            cells: list[Text | str] = [
                _clip(r.model, 14),
                _clip(r.feature, 16 if self.compact else 28),
                _stat("psi", r.psi),
                _stat("ks", r.ks),
                _stat("js", r.js),
                Text(sparkline(r.trend, 10 if self.compact else 16), style=style),
            ]
            out.append((f"{r.model}\0{r.feature}", cells))
        self._sync("drift", cols, out)
        self.query_one("#drift-panel").border_title = "drift (psi warn 0.1, alert 0.25)"

    def _render_pii(self) -> None:
        s = self.state
        by_type = s.pii_by_type.most_common()
        summary = " ".join(f"{t} {n}" for t, n in by_type) or "no PII seen"
        self.query_one("#pii-summary", Static).update(Text(summary, no_wrap=True))
        counts = [
            (f"{m}\0{t}", [_clip(m, 16), t, str(n)]) for m, t, n in s.pii_counts(self.filter_text)
        ]
        self._sync("pii-counts", [("model", "model"), ("type", "type"), ("n", "count")], counts)
        now = s.now_ns()
        recent = [
            (
                f"{e.ts_ns}\0{i}",
                [
                    _age(now - e.ts_ns),
                    _clip(e.model, 12),
                    e.type,
                    _clip(e.location, 22),
                    e.redacted,
                ],
            )
            for i, e in enumerate(s.pii_recent(self.filter_text))
        ]
        self._sync(
            "pii-recent",
            [
                ("age", "ago"),
                ("model", "model"),
                ("type", "type"),
                ("loc", "location"),
                ("red", "redacted"),
            ],
            recent,
        )
        total = sum(s.pii_by_type.values())
        self.query_one("#pii-panel").border_title = f"PII findings · {total}"

    def _render_flows(self) -> None:
        cols: list[tuple[str, str]] = [("id", "id"), ("role", "role")]
        if not self.compact:
            cols.append(("local", "local"))
        cols.append(("remote", "remote"))
        if not self.compact:
            cols.append(("cgroup", "pod cgroup"))
        cols += [("proto", "proto"), ("msgs", "msgs"), ("bytes", "bytes"), ("drops", "drops")]
        out = []
        for f in self.state.flow_rows(self.filter_text):
            cells: list[Text | str] = [str(f.id), f.role]
            if not self.compact:
                cells.append(f.local)
            cells.append(f.remote)
            if not self.compact:
                cells.append(_clip_left(f.cgroup, 40))
            cells += [
                f.protocol or "-",
                str(f.messages),
                _bytes(f.bytes),
                Text(str(f.drops), style="red" if f.drops else ""),
            ]
            out.append((str(f.id), cells))
        self._sync("flows", cols, out)
        self.query_one("#flows-panel").border_title = f"flows · {len(out)}"

    def _render_verdicts(self) -> None:
        cols = [("target", "target"), ("action", "action"), ("reason", "reason")]
        out: list[tuple[str, list[Text | str]]] = [
            (v.key, [v.target, Text(v.action, style="red"), v.reason])
            for v in self.state.verdict_rows(self.filter_text)
        ]
        self._sync("verdicts", cols, out)
        self.query_one("#verdicts-panel").border_title = f"verdicts · {len(out)}"

    def _render_status(self) -> None:
        if self._pending is not None:
            text = Text(self._pending[2], style="bold yellow")
        elif self.agent_error:
            text = Text(f"agent: {self.agent_error}", style="red")
        elif self.message:
            text = Text(self.message)
        elif self.state.activity:
            text = Text(self.state.activity[-1])
        else:
            text = Text("")
        text.no_wrap = True
        text.overflow = "ellipsis"
        self.query_one("#status", Static).update(text)

    def _sync(self, table_id: str, cols: Columns, rows: Rows) -> None:
        sync_table(self.query_one(f"#{table_id}", DataTable), cols, rows)

    # -- keys --

    def action_sort(self) -> None:
        self.sort = MODEL_SORTS[(MODEL_SORTS.index(self.sort) + 1) % len(MODEL_SORTS)]
        self._render_all()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("-shown")
        box.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value
        self._render_all()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if not event.value:
            self.query_one("#filter", Input).remove_class("-shown")
        self.query_one("#models", DataTable).focus()

    def action_escape(self) -> None:
        if self._pending is not None:
            self.action_cancel()
            return
        box = self.query_one("#filter", Input)
        if box.has_focus or box.has_class("-shown"):
            box.value = ""  # fires Input.Changed, which clears the filter
            box.remove_class("-shown")
            self.query_one("#models", DataTable).focus()

    def action_panel(self, name: str) -> None:
        if name in DETAIL_PANELS:
            self.detail = name
            self._layout_for(self.size.width, self.size.height)
        table = "pii-counts" if name == "pii" else name
        self.query_one(f"#{table}", DataTable).focus()

    def selected_target(self) -> tuple[pb.Target, str] | None:
        """What b/u act on: the service of the selected model (models, drift or PII panel), the
        service a selected flow talks to, or a selected verdict's own target."""
        focused = self.focused
        if not isinstance(focused, DataTable) or focused.id is None:
            return None
        key = selected_key(focused)
        if key is None:
            return None
        service = ""
        if focused.id in ("models", "drift", "pii-counts"):
            model, _, rest = key.partition("\0")
            m = self.state.models.get(model)
            service = m.service if m is not None else ""
            if m is not None and focused.id == "models" and rest in m.protocols:
                service = m.protocols[rest].service or service  # the row's own protocol
            what = f"model {model}"
        elif focused.id == "flows":
            flow = next((f for f in self.state.flows if str(f.id) == key), None)
            service = flow.service if flow is not None else ""
            what = f"flow {key}"
        elif focused.id == "verdicts":
            v = next((v for v in self.state.verdicts if v.key == key), None)
            if v is None:
                return None
            if v.flow_id is not None:
                return pb.Target(flow_id=v.flow_id), f"flow {v.flow_id}"
            assert v.service is not None
            ip, port = v.service
            return pb.Target(service=pb.Endpoint(ip=ip, port=port)), v.target
        else:
            return None
        hp = split_hostport(service)
        if hp is None:
            return None
        return (
            pb.Target(service=pb.Endpoint(ip=hp[0], port=hp[1])),
            f"service {service} ({what})",
        )

    def action_ask(self, action: str) -> None:
        chosen = self.selected_target()
        if chosen is None:
            self._pending = None
            self.message = f"{action}: select a model, flow or verdict with a known service first"
        else:
            target, label = chosen
            self._pending = (action, target, f"{action} {label}? y to confirm, n or esc to cancel")
        self._render_status()

    def action_cancel(self) -> None:
        if self._pending is not None:
            self._pending = None
            self.message = "cancelled"
            self._render_status()

    def action_confirm(self) -> None:
        if self._pending is None:
            return
        action, target, _ = self._pending
        self._pending = None
        self.message = f"{action}…"
        self._render_status()
        self.run_worker(lambda: self._send(action, target), thread=True, group="verdict")

    def _send(self, action: str, target: pb.Target) -> None:
        try:
            call = self.source.block if action == "block" else self.source.unblock
            reply = call(target)
            text = reply.description if reply.changed else f"{action}: {reply.description}"
        except grpc.RpcError as exc:
            text = f"{action} failed: {rpc_details(exc)}"
        self._deliver(self._after_send, text)

    def _after_send(self, text: str) -> None:
        self.message = text
        self._render_status()
        self._tick()  # show the new verdict now, not at the next refresh

    # -- for tests and debugging --

    def screen_text(self) -> str:
        """The screen as plain text, as a terminal of this size shows it."""
        width, height = self.size
        console = Console(
            width=width,
            height=height,
            file=io.StringIO(),
            record=True,
            force_terminal=True,
            legacy_windows=False,
        )
        console.print(self.screen._compositor.render_update(full=True))
        return console.export_text(styles=False)
