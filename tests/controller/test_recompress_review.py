"""Review fixes: class profiles frozen under a live rollout, bounded reads of class TOMLs, strict policy types."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlmodel import select

from edgefleet.controller.data.db import Database
from edgefleet.controller.data.registry import Registry
from edgefleet.controller.data.tables import Artifact, Rollout
from edgefleet.controller.errors import ConfigError, ConflictError
from edgefleet.controller.recompress.policy import (
    MAX_POLICY_FILE_BYTES,
    RecompressionPolicy,
    parse_policy,
    policy_of_file,
)
from edgefleet.protocols.errors import ProfileError
from edgefleet.protocols.profile import load_profile

PROFILES = Path(__file__).resolve().parents[2] / "deploy" / "profiles"
DEV_ZERO = Path("/dev/zero")


def live_rollout(db: Database, class_name: str, state: str = "running") -> int:
    """A rollout row to the class in `state` (the engine is not needed to hold a class busy)."""
    registry = Registry(db)
    if not any(m.name == "m" for m in registry.list_models()):
        registry.add_model("m", source="test", task="classification")
    now = dt.datetime.now(dt.UTC)
    with db.transaction() as session:
        artifact = Artifact(model_name="m", class_name=class_name, version=1, sha256="0" * 64, size=1, created_at=now)
        session.add(artifact)
        session.flush()
        rollout = Rollout(
            artifact_id=artifact.id or 0, class_name=class_name, state=state, on_breach="pause", created_at=now,
            updated_at=now,
        )  # fmt: skip
        session.add(rollout)
        session.flush()
        return rollout.id or 0


def set_state(db: Database, rollout_id: int, state: str) -> None:
    with db.transaction() as session:
        rollout = session.get(Rollout, rollout_id)
        assert rollout is not None
        rollout.state = state
        session.add(rollout)


def test_a_class_cannot_be_updated_while_a_rollout_to_it_is_live(database: Database) -> None:
    registry = Registry(database)
    profile = load_profile(PROFILES / "rpi4.toml")
    registry.add_class(profile)
    rollout_id = live_rollout(database, "rpi4")
    faster = profile.model_copy(update={"latency_budget_ms": profile.latency_budget_ms * 2})
    for state in ("pending", "running", "paused"):
        set_state(database, rollout_id, state)
        with pytest.raises(ConflictError, match=rf"rollout {rollout_id} to class 'rpi4' is {state}: wait .* abort"):
            registry.update_class(faster)
        assert registry.get_class("rpi4")[1] == profile  # unchanged
    set_state(database, rollout_id, "completed")
    assert registry.update_class(faster).profile_json == faster.model_dump_json()


def test_cli_class_update_during_a_live_rollout_exits_1(ready, profiles: Path) -> None:
    db = Database.open(f"sqlite:///{ready.home / 'registry.db'}")
    try:
        rollout_id = live_rollout(db, "rpi4", "paused")
        result = ready("class", "update", "rpi4", "--profile", str(profiles / "rpi4.toml"))
        assert result.exit_code == 1
        assert f"rollout {rollout_id} to class 'rpi4' is paused" in result.output
        assert "Traceback" not in result.output
        set_state(db, rollout_id, "aborted")
        ready.ok("class", "update", "rpi4", "--profile", str(profiles / "rpi4.toml"))
        with db.reading() as session:
            assert session.exec(select(Rollout)).one().state == "aborted"
    finally:
        db.dispose()


@pytest.mark.parametrize("reader", ["policy", "profile"])
def test_endless_and_oversized_class_files_are_refused_without_reading_them_whole(reader: str, tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    big.write_bytes(b"[policy]\nmode = 'auto'\n" + b"#" * (8 * 1024 * 1024))
    for path in (DEV_ZERO, big):
        if reader == "policy":
            with pytest.raises(ConfigError, match=f"more than {MAX_POLICY_FILE_BYTES} bytes"):
                policy_of_file(path)
        else:
            with pytest.raises(ProfileError, match="more than 65536 bytes"):
                load_profile(path)
    at_limit = tmp_path / "at_limit.toml"
    at_limit.write_bytes(b"[policy]\nmode = 'auto'\n".ljust(MAX_POLICY_FILE_BYTES, b"#"))
    policy = policy_of_file(at_limit)
    assert policy is not None
    assert policy.mode == "auto"


def test_cli_class_update_from_dev_zero_is_refused(ready) -> None:
    result = ready("class", "update", "rpi4", "--profile", "/dev/zero")
    assert result.exit_code == 1
    assert "more than 65536 bytes" in result.output


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ({"latency_windows": True}, "latency_windows"),
        ({"latency_windows": 2.0}, "latency_windows"),
        ({"latency_windows": "3"}, "latency_windows"),
        ({"lookback_s": "60"}, "lookback_s"),
        ({"cooldown_s": True}, "cooldown_s"),
        ({"max_oom_rate": "0.1"}, "max_oom_rate"),
        ({"accuracy": 1}, "accuracy"),
        ({"accuracy": "yes"}, "accuracy"),
        ({"min_samples": 10.5}, "min_samples"),
        ({"speed_factor_tolerance": "0.3"}, "speed_factor_tolerance"),
    ],
)
def test_policy_types_are_strict(table: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"\[policy\] {field}"):
        parse_policy({"policy": table}, source="rpi4.toml")


def test_policy_ints_still_fit_float_fields_and_false_turns_the_speed_factor_off() -> None:
    policy = parse_policy(
        {"policy": {"lookback_s": 60, "cooldown_s": 0, "max_oom_rate": 0, "speed_factor_tolerance": False}}
    )
    assert policy is not None
    assert (policy.lookback_s, policy.cooldown_s, policy.max_oom_rate) == (60.0, 0.0, 0.0)
    assert policy.speed_factor_tolerance is None
    assert RecompressionPolicy.model_validate_json(policy.model_dump_json()) == policy  # stored form reads back
