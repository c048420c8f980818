"""What the demo shows: progress bars per class, the live fleet table (models running, recent p95 against the
budget, accuracy, what is happening), and at the end a summary per class: its versions and where their rollouts
ended, the model it runs, p95 against budget, accuracy, and the story of what happened to it.

The numbers are the controller's: devices from the registry database, latency and accuracy from the telemetry
rollups (latency bucket counts added up exactly, the p95 interpolated as Prometheus' `histogram_quantile` does).

Every sentence is computed: a verdict word ("within", "over", "below") is chosen by comparing the numbers it shows,
an aborted rollout's line gives its breach (gate, value against threshold, latency in ms), and `disagreements`
checks a class's table against its story (the versions and rollouts the events name, the final states they tell).

Example::

    ok, lines = closing_verdict(stories, problems, share=0.8)
    assert not disagreements(stories[0])
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = [
    "Breach",
    "ClassStory",
    "GateBreach",
    "OverviewRow",
    "StoryEvent",
    "VersionStory",
    "Waiting",
    "breach_sentence",
    "budget_verdict",
    "class_verdict",
    "closing_verdict",
    "disagreements",
    "gate_number",
    "histogram_quantile",
    "needed_devices",
    "render_overview",
    "render_summary",
    "version_line",
    "wait_with_bars",
]

LATENCY = "edgefleet_inference_latency_seconds"


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' `histogram_quantile` on cumulative (upper bound, count) pairs: linear within the bucket."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower
            width = count - below
            return lower + (bound - lower) * ((rank - below) / width if width > 0 else 1.0)
        lower, below = bound, count
    return lower


@dataclass(frozen=True, slots=True)
class Waiting:
    """One class's bar while waiting: `count` of `total`, a detail line, and whether the wait is over."""

    count: int
    total: int
    detail: str
    done: bool


def wait_with_bars(
    console: Console,
    title: str,
    poll: Callable[[], dict[str, Waiting]],
    *,
    classes: Sequence[str],
    timeout: float,
    check: Callable[[], None],
    interval: float = 0.5,
) -> bool:
    """Show a bar per class, polling until every class is done (True) or `timeout` passes (False)."""
    began = time.monotonic()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"))
    with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
        bars = {c: progress.add_task(f"{title} {c}", total=None, detail="") for c in classes}
        while True:
            check()
            state = poll()
            for c, w in state.items():
                progress.update(bars[c], completed=w.count, total=w.total, detail=w.detail)
            if all(w.done for w in state.values()):
                return True
            if time.monotonic() - began > timeout:
                return False
            time.sleep(interval)


# ---------------------------------------------------------------------------------------------------- the whole story
HIGHER_IS_BETTER = frozenset({"accuracy"})
_THRESHOLD_NAME = {"accuracy": "floor", "latency_p95": "budget"}  # the others: "limit"


@dataclass(frozen=True, slots=True)
class GateBreach:
    """One breached gate as the judge stored it (`rollouts.breach_json`): latency in seconds, the rest fractions."""

    name: str
    value: float | None
    threshold: float | None
    devices: int = 0
    samples: int = 0
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Breach:
    """Why a rollout stopped: the gates that breached in a wave and the action taken, or an operator's stop."""

    wave: int | None
    action: str
    gates: tuple[GateBreach, ...] = ()
    by: str = ""
    reason: str = ""

    @classmethod
    def from_json(cls, detail: dict[str, Any]) -> Breach:
        """From `rollouts.breach_json` (see `rollout_judge`); "+Inf" comes back as infinity."""
        gates = tuple(
            GateBreach(
                name=str(g.get("name", "?")),
                value=_number(g.get("value")),
                threshold=_number(g.get("threshold")),
                devices=int(g.get("devices") or 0),
                samples=int(g.get("samples") or 0),
                detail=str(g.get("detail") or ""),
            )
            for g in detail.get("gates") or []
        )
        wave = detail.get("wave")
        return cls(
            wave=wave if isinstance(wave, int) else None,
            action=str(detail.get("action") or ""),
            gates=gates,
            by=str(detail.get("by") or ""),
            reason=str(detail.get("reason") or ""),
        )


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if value == "+Inf":
        return math.inf
    return None


def gate_number(gate: str, value: float | None) -> str:
    """A gate's number as the report shows it: latency in ms (the gates judge seconds), accuracy in %."""
    if value is None:
        return "no value"
    if gate == "latency_p95":
        return "above the last latency bucket" if math.isinf(value) else f"{value * 1000:.2f} ms"
    if math.isinf(value):
        return "+Inf"
    return f"{value:.1%}" if gate == "accuracy" else f"{value:.3g}"


def wave_label(wave: int | None) -> str:
    return "an unknown wave" if wave is None else "the canary" if wave == 0 else f"wave {wave}"


def gate_sentence(gate: GateBreach) -> str:
    """`accuracy 38.9% below its floor 91.7% (36 samples from 2 devices)`: the word chosen by comparing."""
    value, threshold = gate_number(gate.name, gate.value), gate_number(gate.name, gate.threshold)
    kind = _THRESHOLD_NAME.get(gate.name, "limit")
    if gate.value is None or gate.threshold is None:
        text = f"{gate.name} {value} (its {kind} {threshold})"
    elif gate.name in HIGHER_IS_BETTER:
        below = gate.value < gate.threshold
        text = f"{gate.name} {value} {'below' if below else 'not below'} its {kind} {threshold}"
    else:
        over = gate.value > gate.threshold
        text = f"{gate.name} {value} {'over' if over else 'within'} its {kind} {threshold}"
    evidence = f"{gate.samples} samples from {gate.devices} device(s)" if gate.samples else ""
    extra = "; ".join(p for p in (evidence, gate.detail) if p)
    return f"{text} ({extra})" if extra else text


def breach_sentence(breach: Breach) -> str:
    """Why a rollout stopped, with each breached gate's value against its threshold."""
    if not breach.gates:
        return f"stopped by {breach.by or 'an operator'}: {breach.reason or 'no reason given'}"
    gates = ", ".join(gate_sentence(g) for g in breach.gates)
    action = f"; on breach: {breach.action}" if breach.action else ""
    return f"{gates} in {wave_label(breach.wave)}{action}"


def budget_verdict(p95_ms: float | None, budget_ms: float) -> tuple[bool | None, str]:
    """(within?, words): `0.54 ms within its 2 ms budget`, `2.93 ms over ...`, or no samples (None)."""
    if p95_ms is None:
        return None, f"no samples to judge against its {budget_ms:g} ms budget"
    within = p95_ms <= budget_ms
    return within, f"{p95_ms:.2f} ms {'within' if within else 'over'} its {budget_ms:g} ms budget"


@dataclass(frozen=True, slots=True)
class StoryEvent:
    """One line of a class's story, with what it names: a version, a rollout, the final state it reports."""

    at_s: float  # since the demo began
    text: str
    version: int | None = None
    rollout_id: int | None = None
    rollout_state: str | None = None  # only a final state ("completed", "aborted"): the table must show the same

    def __str__(self) -> str:
        return f"{self.at_s:.0f}s {self.text}"


@dataclass(slots=True)
class VersionStory:
    """One artifact built for a class, and where its rollout ended."""

    version: int
    recipe: str
    made_by: str  # "compression", "recompression", "planted bad artifact", "registry" (none of the demo's)
    accuracy_measured: float | None
    artifact_bytes: int
    rollout_id: int | None = None
    rollout_state: str = ""
    rollout_devices: dict[str, int] = field(default_factory=dict)
    waves_opened: int = 0
    breach: Breach | None = None


@dataclass(slots=True)
class ClassStory:
    """A class through the demo: its versions, what happened, and its numbers at the end."""

    device_class: str
    latency_budget_ms: float
    device_over_host: float  # fp32 path, this host's reference times against the profile's
    versions: list[VersionStory] = field(default_factory=list)
    events: list[StoryEvent] = field(default_factory=list)
    current_version: int | None = None
    devices_total: int = 0
    devices_online: int = 0
    devices_on_current: int = 0
    p95_latency_ms: float | None = None  # the current version, over the last seconds
    accuracy: float | None = None  # the current version, over the last seconds
    labelled_samples: int = 0
    within_budget: bool | None = None
    recompressions: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Events as the lines the report prints (`events`) and as data (`event_log`); each version's table line."""
        value = asdict(self)
        value["events"] = [str(e) for e in self.events]
        value["event_log"] = [asdict(e) for e in self.events]
        for row, version in zip(value["versions"], self.versions, strict=True):
            row["line"] = version_line(version)
        return value


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


_MADE_BY = {"recompression": "recompressed ", "planted bad artifact": "planted ", "registry": "(not the demo's) "}


def _devices(states: dict[str, int]) -> str:
    return ", ".join(f"{s.replace('_', ' ')} {n}" for s, n in states.items()) or "no devices"


def version_line(v: VersionStory) -> str:
    """`v2 planted distill w0.5: rollout 4 aborted (rolled back 2): accuracy 38.9% below its floor 91.7% ...`"""
    head = f"v{v.version} {_MADE_BY.get(v.made_by, '')}{v.recipe}"
    if v.rollout_id is None:
        return f"{head}: not rolled out"
    line = f"{head}: rollout {v.rollout_id} {v.rollout_state or 'state unknown'} ({_devices(v.rollout_devices)})"
    return f"{line}: {breach_sentence(v.breach)}" if v.breach is not None else line


def needed_devices(total: int, share: float) -> int:
    """Devices that must run the current model: `share` of `total`, rounded up (0.8 x 15 is 12, not 13)."""
    return math.ceil(round(share * total, 9))


def class_verdict(s: ClassStory, *, share: float) -> tuple[bool, str]:
    """Whether the class ended as told (enough devices on its current model, p95 within budget), in words."""
    if s.current_version is None:
        return False, f"{s.device_class}: no online device runs a model ({s.devices_online}/{s.devices_total} online)"
    needed = needed_devices(s.devices_total, share)
    enough = s.devices_on_current >= needed
    within, budget = budget_verdict(s.p95_latency_ms, s.latency_budget_ms)
    devices = (f"v{s.current_version} on {s.devices_on_current}/{s.devices_total} devices "
               f"({'at least' if enough else 'fewer than'} the {needed} needed)")  # fmt: skip
    accuracy = f"accuracy {_pct(s.accuracy)} on {s.labelled_samples} labelled samples"
    return enough and within is True, f"{s.device_class}: {devices}, p95 {budget}, {accuracy}"


def closing_verdict(stories: Sequence[ClassStory], problems: Sequence[str], *, share: float) -> tuple[bool, list[str]]:
    """The run's verdict and its lines: one per class with its numbers, then the sentence that sums them up."""
    verdicts = [class_verdict(s, share=share) for s in stories]
    lines = [text for _, text in verdicts]
    short = [s.device_class for s, (ok, _) in zip(stories, verdicts, strict=True) if not ok]
    ok = bool(stories) and not short and not problems
    if not stories:
        lines.append("no class ran")
    elif ok:
        lines.append(
            f"every class ({len(stories)}) runs its current model on at least {share:.0%} of its devices, "
            "within its latency budget"
        )
    else:
        what = [f"{len(short)} of {len(stories)} classes not as told ({', '.join(short)})"] if short else []
        what += [f"{len(problems)} problem(s)"] if problems else []
        lines.append("not as told: " + "; ".join(what))
    return ok, lines


def disagreements(s: ClassStory) -> list[str]:
    """Where the class's table and its story disagree: a version or rollout the events name that the versions
    column lacks (or the reverse), a final state told differently, an abort without its reason."""
    found: list[str] = []
    by_version: dict[int, VersionStory] = {}
    for v in s.versions:
        if v.version in by_version:
            found.append(f"v{v.version} is listed twice in the versions column")
        by_version[v.version] = v
    if [v.version for v in s.versions] != sorted(by_version):
        found.append("the versions column is not in version order")
    told: set[int] = set()
    for e in s.events:
        found.extend(_event_against_table(e, by_version, told))
    for v in s.versions:
        if v.version not in told:
            found.append(f"v{v.version} is in the versions column, yet no event tells of it")
        if v.rollout_state == "aborted" and v.breach is None:
            found.append(f"rollout {v.rollout_id} of v{v.version} aborted, and the table gives no reason")
    if s.current_version is not None and s.current_version not in by_version:
        found.append(f"the class runs v{s.current_version}, which its versions column lacks")
    return found


def _event_against_table(e: StoryEvent, by_version: dict[int, VersionStory], told: set[int]) -> list[str]:
    """What one event says that the table does not; the versions it tells of are added to `told`."""
    found = []
    if e.version is not None:
        told.add(e.version)
        if e.version not in by_version:
            found.append(f"the event '{e}' names v{e.version}, which the versions column lacks")
    if e.rollout_id is None:
        return found
    v = next((v for v in by_version.values() if v.rollout_id == e.rollout_id), None)
    if v is None:
        return [*found, f"the event '{e}' names rollout {e.rollout_id}, which no version in the table has"]
    told.add(v.version)
    if e.version is not None and e.version != v.version:
        found.append(f"the event '{e}' puts rollout {e.rollout_id} on v{e.version}; the table on v{v.version}")
    if e.rollout_state is not None and e.rollout_state != v.rollout_state:
        found.append(f"the event '{e}' says rollout {e.rollout_id} {e.rollout_state}; the table says "
                     f"{v.rollout_state or 'nothing'}")  # fmt: skip
    return found


def render_summary(stories: Sequence[ClassStory], *, share: float) -> Group:
    """The final table (one row per class), then each class's story, one line per event."""
    table = Table(title="edgefleet demo: classes at the end", title_justify="left", title_style="bold", show_lines=True)
    for name in ("class", "versions and their rollouts", "running", "p95 vs budget", "accuracy"):
        table.add_column(name, overflow="fold")
    for s in stories:
        within, budget = budget_verdict(s.p95_latency_ms, s.latency_budget_ms)
        colour = {True: "green", False: "red", None: "yellow"}[within]
        running = "-"
        if s.current_version is not None:
            needed = needed_devices(s.devices_total, share)
            mark = "" if s.devices_on_current >= needed else f" [red](fewer than {needed})[/]"
            running = f"v{s.current_version} {s.devices_on_current}/{s.devices_total}{mark}"
        table.add_row(
            s.device_class,
            "\n".join(escape(version_line(v)) for v in s.versions) or "-",
            running,
            f"[{colour}]{budget}[/]" if s.current_version is not None else "-",
            _pct(s.accuracy),
        )
    lines: list[str] = []
    for s in stories:
        lines.append(f"[bold]{s.device_class}[/]")
        lines.extend(f"  {escape(str(event))}" for event in s.events)
    return Group(table, "what happened:", *lines)


@dataclass(frozen=True, slots=True)
class OverviewRow:
    """One class in the live view."""

    device_class: str
    versions: dict[int | None, int]  # model version -> online devices running it
    online: int
    total: int
    p95_ms: float | None
    budget_ms: float
    accuracy: float | None
    note: str


def render_overview(rows: Sequence[OverviewRow]) -> Table:
    table = Table(title="fleet", title_justify="left", title_style="bold")
    for name in ("class", "online", "models running", "p95 (last 12 s)", "accuracy", "now"):
        table.add_column(name)
    for r in rows:
        models = ", ".join(f"v{v} x{n}" if v is not None else f"none x{n}" for v, n in sorted(
            r.versions.items(), key=lambda kv: kv[0] or 0)) or "-"  # fmt: skip
        p95 = _ms(r.p95_ms)
        if r.p95_ms is not None:
            p95 = f"[green]{p95}[/]" if r.p95_ms <= r.budget_ms else f"[red]{p95}[/]"
        table.add_row(
            r.device_class, f"{r.online}/{r.total}", models, f"{p95} of {r.budget_ms:g}", _pct(r.accuracy), r.note
        )
    return table
