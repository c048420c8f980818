"""The demo's report is computed from data: verdict words chosen by comparing the numbers shown, an abort's line
with its breach (latency in ms), every artifact of a class in its versions column, and a table that agrees with the
story's events. Built from constructed stories and a real SQLite registry; no broker, no fleet."""

from __future__ import annotations

import datetime as dt
import io
import json
import types
from pathlib import Path

import pytest
from rich.console import Console

from edgefleet.controller.config import Settings
from edgefleet.controller.data.db import Database
from edgefleet.controller.data.home import init_home, open_database
from edgefleet.controller.data.tables import Artifact, Recompression, Rollout, RolloutDevice, utcnow
from edgefleet.controller.demo.report import (
    Breach,
    ClassStory,
    StoryEvent,
    VersionStory,
    breach_sentence,
    budget_verdict,
    closing_verdict,
    disagreements,
    render_summary,
    version_line,
)
from edgefleet.controller.demo.run import ALLOWED_FAILURES, Demo, DemoOptions, default_profiles_dir
from edgefleet.controller.demo.setup import prepare_registry
from edgefleet.controller.demo.story import class_artifacts, rollout_outcome

ACCURACY_BREACH = {
    "gates": [{"name": "accuracy", "status": "breach", "value": 0.3889, "threshold": 0.917, "devices": 2,
               "samples": 36, "detail": ""}],
    "wave": 0, "action": "abort", "at": "2025-01-01T00:00:00+00:00",
}  # fmt: skip
LATENCY_BREACH = {
    "gates": [{"name": "latency_p95", "status": "breach", "value": 0.001, "threshold": 0.0005, "devices": 2,
               "samples": 60, "detail": ""}],
    "wave": 1, "action": "abort",
}  # fmt: skip


def _story(*, p95: float | None = 0.54, on_current: int = 10) -> ClassStory:
    """rpi4 as a good run ends: v1 out, v2 planted and aborted at the canary, v3 recompressed and out."""
    story = ClassStory("rpi4", 2.0, 3.07, current_version=3, devices_total=10, devices_online=10,
                       devices_on_current=on_current, p95_latency_ms=p95, accuracy=0.992,
                       labelled_samples=120)  # fmt: skip
    story.versions = [
        VersionStory(1, "distill w1", "compression", 0.997, 699021, rollout_id=2, rollout_state="completed",
                     rollout_devices={"active": 10}, waves_opened=3),
        VersionStory(2, "distill w1, labels swapped", "planted bad artifact", 0.39, 699021, rollout_id=4,
                     rollout_state="aborted", rollout_devices={"rolled_back": 2}, waves_opened=1,
                     breach=Breach.from_json(ACCURACY_BREACH)),
        VersionStory(3, "distill w0.25", "recompression", 0.99, 52000, rollout_id=5, rollout_state="completed",
                     rollout_devices={"active": 10}, waves_opened=3),
    ]  # fmt: skip
    story.events = [
        StoryEvent(44, "v1: rollout 2 completed, 10 active after 3 wave(s)", 1, 2, "completed"),
        StoryEvent(45, "planted: v2 ...; rollout 4", 2, 4),
        StoryEvent(53, "rollout 4 aborted: rolled back 2", None, 4, "aborted"),
        StoryEvent(95, "built v3 distill w0.25 (...); rollout 5", 3, 5),
        StoryEvent(111, "v3: rollout 5 completed, 10 active after 3 wave(s)", 3, 5, "completed"),
    ]
    return story


def _text(stories: list[ClassStory]) -> str:
    console = Console(file=io.StringIO(), width=300, record=True)
    console.print(render_summary(stories, share=ALLOWED_FAILURES))
    return console.export_text()


def test_a_breach_is_told_with_its_gate_value_and_threshold_latency_in_ms() -> None:
    assert breach_sentence(Breach.from_json(ACCURACY_BREACH)) == (
        "accuracy 38.9% below its floor 91.7% (36 samples from 2 device(s)) in the canary; on breach: abort"
    )
    latency = breach_sentence(Breach.from_json(LATENCY_BREACH))
    assert latency.startswith("latency_p95 1.00 ms over its budget 0.50 ms")  # not "0.001 vs 0.0005" seconds
    assert "in wave 1" in latency
    inf = Breach.from_json({**LATENCY_BREACH, "gates": [{**LATENCY_BREACH["gates"][0], "value": "+Inf"}]})
    assert "above the last latency bucket over its budget 0.50 ms" in breach_sentence(inf)
    stopped = Breach.from_json({"by": "alice", "reason": "wrong model"})
    assert breach_sentence(stopped) == "stopped by alice: wrong model"


def test_an_aborted_version_gives_its_reason_and_every_version_is_in_the_table() -> None:
    story = _story()
    line = version_line(story.versions[1])
    assert line == ("v2 planted distill w1, labels swapped: rollout 4 aborted (rolled back 2): accuracy 38.9% below "
                    "its floor 91.7% (36 samples from 2 device(s)) in the canary; on breach: abort")  # fmt: skip
    text = _text([story])
    for v in (1, 2, 3):
        assert f"v{v} " in text
    assert "v3 10/10" in text
    assert "0.54 ms within its 2 ms budget" in text
    assert disagreements(story) == []


@pytest.mark.parametrize(
    ("p95", "expected"),
    [(0.54, (True, "0.54 ms within its 2 ms budget")), (2.93, (False, "2.93 ms over its 2 ms budget")),
     (2.0, (True, "2.00 ms within its 2 ms budget")), (None, (None, "no samples to judge against its 2 ms budget"))],
)  # fmt: skip
def test_the_budget_verdict_is_chosen_by_comparing(p95: float | None, expected: tuple[bool | None, str]) -> None:
    assert budget_verdict(p95, 2.0) == expected


def test_the_closing_verdict_is_computed_per_class_with_its_numbers() -> None:
    ok, lines = closing_verdict([_story()], [], share=ALLOWED_FAILURES)
    assert ok
    assert lines[0] == ("rpi4: v3 on 10/10 devices (at least the 8 needed), p95 0.54 ms within its 2 ms budget, "
                        "accuracy 99.2% on 120 labelled samples")  # fmt: skip
    assert lines[-1].startswith("every class (1) runs its current model on at least 80% of its devices")

    ok, lines = closing_verdict([_story(p95=2.93)], [], share=ALLOWED_FAILURES)
    assert not ok
    assert "p95 2.93 ms over its 2 ms budget" in lines[0]
    assert lines[-1] == "not as told: 1 of 1 classes not as told (rpi4)"
    assert "2.93 ms over its 2 ms budget" in _text([_story(p95=2.93)])

    ok, lines = closing_verdict([_story(on_current=7)], ["x: something"], share=ALLOWED_FAILURES)
    assert not ok
    assert "v3 on 7/10 devices (fewer than the 8 needed)" in lines[0]
    assert lines[-1] == "not as told: 1 of 1 classes not as told (rpi4); 1 problem(s)"
    ok, lines = closing_verdict([_story(p95=None)], [], share=ALLOWED_FAILURES)
    assert not ok  # no samples is not "within its budget"


def test_a_table_that_disagrees_with_its_events_is_caught() -> None:
    # the user's report: a recompression's v3 told in the story, missing from the versions column
    missing = _story()
    missing.versions.pop()
    found = disagreements(missing)
    assert any("names v3, which the versions column lacks" in d for d in found)
    assert any("names rollout 5, which no version in the table has" in d for d in found)
    assert any("the class runs v3, which its versions column lacks" in d for d in found)

    # an abort without its reason
    silent = _story()
    silent.versions[1].breach = None
    assert disagreements(silent) == ["rollout 4 of v2 aborted, and the table gives no reason"]

    # a final state told one way in the story and another in the table
    told = _story()
    told.versions[2].rollout_state = "aborted"
    told.versions[2].breach = Breach.from_json(LATENCY_BREACH)
    assert any("says rollout 5 completed; the table says aborted" in d for d in disagreements(told))

    # a version in the table that no event tells of
    untold = _story()
    untold.events = [e for e in untold.events if e.version != 3 and e.rollout_id != 5]
    assert disagreements(untold) == ["v3 is in the versions column, yet no event tells of it"]


def test_the_json_carries_the_lines_the_report_prints() -> None:
    value = json.loads(json.dumps(_story().as_dict()))
    assert value["events"][0] == "44s v1: rollout 2 completed, 10 active after 3 wave(s)"
    assert value["event_log"][2] == {"at_s": 53, "text": "rollout 4 aborted: rolled back 2", "version": None,
                                     "rollout_id": 4, "rollout_state": "aborted"}  # fmt: skip
    assert "accuracy 38.9% below its floor 91.7%" in value["versions"][1]["line"]
    assert value["versions"][1]["breach"]["gates"][0]["threshold"] == 0.917


# ---------------------------------------------------------------------------------------------- from the registry
def _registry(tmp_path: Path) -> tuple[Database, int, int]:
    """x86-gateway with three artifacts: v1 rolled out, v2 aborted at the canary, v3 built by a recompression and
    rolled out (the one the demo never followed). Returns the database and the ids of rollouts 2 and 3."""
    home = tmp_path / "home"
    settings = Settings(home=home, fleet="demo")
    init_home(settings)
    db = open_database(settings)
    prepare_registry(db, fleet="demo", classes=("x86-gateway",), devices=2, profiles_dir=default_profiles_dir(),
                     model="digits", home=home, mqtt_host="127.0.0.1", mqtt_port=1884)  # fmt: skip
    passes = [[{"kind": "distill", "width": 0.5}], [{"kind": "distill", "width": 0.5}],
              [{"kind": "distill", "width": 0.25}, {"kind": "quantize_static"}]]  # fmt: skip
    with db.transaction("adding artifacts") as session:
        artifacts = [
            Artifact(model_name="digits", class_name="x86-gateway", version=n + 1, sha256=f"{n:064x}", size=1000 + n,
                     recipe_json=json.dumps(p), metrics_json=json.dumps({"accuracy": 0.99 - n / 10}),
                     created_at=utcnow() + dt.timedelta(seconds=10 * n))
            for n, p in enumerate(passes)
        ]  # fmt: skip
        session.add_all(artifacts)
        session.flush()
        ids = [a.id for a in artifacts]
        assert all(i is not None for i in ids)
        rollouts = [
            Rollout(artifact_id=ids[0], class_name="x86-gateway", state="completed", on_breach="abort"),
            Rollout(artifact_id=ids[1], class_name="x86-gateway", state="aborted", on_breach="abort",
                    breach_json=json.dumps(LATENCY_BREACH), current_wave=0),
            Rollout(artifact_id=ids[2], class_name="x86-gateway", state="completed", on_breach="abort"),
        ]  # fmt: skip
        session.add_all(rollouts)
        session.flush()
        for r, state in zip(rollouts, ("active", "rolled_back", "active"), strict=True):
            for device in ("x86-gateway-00000", "x86-gateway-00001"):
                session.add(RolloutDevice(rollout_id=r.id or 0, device_id=device, wave=0, state=state))
        session.add(Recompression(class_name="x86-gateway", model_name="digits", from_artifact_id=ids[0] or 0,
                                  trigger="latency", state="done", mode="auto", artifact_id=ids[2],
                                  rollout_id=rollouts[2].id))  # fmt: skip
    return db, rollouts[0].id or 0, rollouts[1].id or 0


def test_every_artifact_of_a_class_is_in_its_versions_column_with_its_story(tmp_path: Path) -> None:
    db, first, aborted = _registry(tmp_path)
    try:
        facts = class_artifacts(db, "x86-gateway")
        assert [(f.version, f.recipe, f.recompression_id is not None) for f in facts] == [
            (1, "distill w0.5", False), (2, "distill w0.5", False), (3, "distill w0.25 > quantize_static", True),
        ]  # fmt: skip
        breach = rollout_outcome(db, aborted, version=2).breach
        assert breach is not None
        assert breach.gates[0].value == 0.001  # as stored: seconds; shown in ms

        # the demo followed v1 and the planted v2 live; v3 came from a recompression it did not follow
        demo = Demo(DemoOptions(home=tmp_path, classes=("x86-gateway",), slow_class=None),
                    console=Console(file=io.StringIO()))  # fmt: skip
        demo.app = types.SimpleNamespace(db=db)  # type: ignore[assignment]  # only the registry is read
        demo._began_utc = facts[0].created_at - dt.timedelta(seconds=40)
        story = demo.stories["x86-gateway"] = ClassStory("x86-gateway", 0.5, 1.0, current_version=3)
        story.versions = [VersionStory(1, "distill w0.5", "compression", 0.99, 1000, rollout_id=first),
                          VersionStory(2, "distill w0.5, labels swapped", "planted bad artifact", 0.4, 1001,
                                       rollout_id=aborted)]  # fmt: skip
        story.events = [StoryEvent(44, "v1: rollout completed", 1, first, "completed"),
                        StoryEvent(45, "planted v2", 2, aborted)]  # fmt: skip
        demo._versions_from_registry("x86-gateway")

        assert [(v.version, v.made_by, v.rollout_state) for v in story.versions] == [
            (1, "compression", "completed"), (2, "planted bad artifact", "aborted"), (3, "recompression", "completed"),
        ]  # fmt: skip
        assert "latency_p95 1.00 ms over its budget 0.50 ms" in version_line(story.versions[1])
        told = story.events[-1]
        assert told.at_s == pytest.approx(60, abs=1)  # when the registry built it, not when the demo found it
        assert told.text.startswith("v3 distill w0.25 > quantize_static built by recompression 1 (latency), not "
                                    "followed live; rollout 3 completed")  # fmt: skip
        assert disagreements(story) == []
        assert "v3 recompressed distill w0.25 > quantize_static: rollout 3 completed (active 2)" in _text([story])
    finally:
        db.dispose()
