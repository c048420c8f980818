"""The device registry: fleets, device classes, devices, models and the audit log, each write one transaction.

Every operator action that changes the registry adds an `AuditEntry` in the same transaction, so the log and
the change cannot disagree. Device secrets are returned once by `register_devices` and stored only as hashes.

Example::

    reg = Registry(db)
    reg.create_fleet("default")
    reg.add_class(load_profile("deploy/profiles/rpi4.toml"))
    creds = reg.register_devices(["pi-001"], class_name="rpi4", fleet="default")
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlmodel import Session, col, func, select

from edgefleet.controller.credentials import hash_secret, new_secret
from edgefleet.controller.data.db import Database
from edgefleet.controller.data.states import RolloutState
from edgefleet.controller.data.tables import (
    AuditEntry,
    ClassPolicy,
    Device,
    DeviceClass,
    Fleet,
    Model,
    Rollout,
    utcnow,
)
from edgefleet.controller.errors import ConflictError, NotFoundError, RegistryError
from edgefleet.controller.recompress.policy import RecompressionPolicy
from edgefleet.protocols.errors import TopicError
from edgefleet.protocols.profile import DeviceProfile
from edgefleet.protocols.topics import check_id

__all__ = ["DeviceCredential", "Registry", "check_device_id", "check_name", "profile_of"]

RESERVED_PREFIX = "edgefleet-"  # MQTT usernames of the controller and the CLI
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LIVE_ROLLOUT_STATES = (RolloutState.PENDING.value, RolloutState.RUNNING.value, RolloutState.PAUSED.value)


def check_name(kind: str, name: str) -> str:
    """Fleet and class names: lower case letters, digits, `-` and `_`, at most 63 characters.

    Stricter than the wire's id rule (`check_id`), so every valid name is also a valid topic level.
    """
    if not NAME_RE.match(name):
        raise RegistryError(f"{kind} name {name!r} is not valid: use lower case letters, digits, '-' or '_' (max 63)")
    return name


def check_device_id(device_id: str) -> str:
    """Device ids become MQTT usernames and topic levels: the wire contract's id rule (`check_id`)."""
    try:
        check_id(device_id, what="device id")
    except TopicError as exc:
        raise RegistryError(str(exc)) from exc
    if device_id.lower().startswith(RESERVED_PREFIX):
        raise RegistryError(f"device id {device_id!r}: ids starting with {RESERVED_PREFIX!r} are the controller's")
    return device_id


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceCredential:
    """What a device needs to connect; shown to the operator once."""

    device_id: str
    username: str
    password: str
    class_name: str
    fleet: str


class Registry:
    """Operator-facing registry operations over a `Database`."""

    def __init__(self, db: Database, *, actor: str = "operator", clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.db = db
        self.actor = actor
        self.clock = clock

    # ------------------------------------------------------------------ audit
    def audit(self, session: Session, action: str, target: str, **detail: Any) -> None:
        """Add an audit row inside the caller's transaction."""
        session.add(
            AuditEntry(
                at=self.clock(),
                actor=self.actor,
                action=action,
                target=target,
                detail_json=json.dumps(detail, sort_keys=True, default=str),
            )
        )

    def audit_log(self, *, limit: int = 100) -> list[AuditEntry]:
        with self.db.reading() as session:
            rows = session.exec(select(AuditEntry).order_by(col(AuditEntry.id).desc()).limit(limit)).all()
        return list(rows)

    # ------------------------------------------------------------------ fleets
    def create_fleet(self, name: str) -> Fleet:
        check_name("fleet", name)
        with self.db.transaction(f"creating fleet {name!r}") as session:
            if session.get(Fleet, name) is not None:
                raise ConflictError(f"fleet {name!r} already exists")
            fleet = Fleet(name=name, created_at=self.clock())
            session.add(fleet)
            self.audit(session, "fleet.create", name)
        return fleet

    def ensure_fleet(self, name: str) -> Fleet:
        """The fleet, created when missing (used by `init`)."""
        check_name("fleet", name)
        with self.db.transaction(f"creating fleet {name!r}") as session:
            fleet = session.get(Fleet, name)
            if fleet is None:
                fleet = Fleet(name=name, created_at=self.clock())
                session.add(fleet)
                self.audit(session, "fleet.create", name)
        return fleet

    def list_fleets(self) -> list[tuple[Fleet, int]]:
        """Fleets with their device counts."""
        with self.db.reading() as session:
            counts = dict(session.exec(select(Device.fleet, func.count()).group_by(col(Device.fleet))).all())
            fleets = session.exec(select(Fleet).order_by(col(Fleet.name))).all()
        return [(f, int(counts.get(f.name, 0))) for f in fleets]

    # ------------------------------------------------------------------ classes
    def add_class(
        self, profile: DeviceProfile, *, name: str | None = None, policy: RecompressionPolicy | None = None
    ) -> DeviceClass:
        """Add a class; `policy` (the `[policy]` table of its TOML) is stored with it in the same transaction."""
        class_name = check_name("class", name or profile.name)
        with self.db.transaction(f"adding class {class_name!r}") as session:
            if session.get(DeviceClass, class_name) is not None:
                raise ConflictError(
                    f"device class {class_name!r} already exists (change it with `edgefleet class update`)"
                )
            row = DeviceClass(name=class_name, profile_json=profile.model_dump_json(), created_at=self.clock())
            session.add(row)
            self.audit(session, "class.add", class_name, profile=profile.model_dump(mode="json"))
            if policy is not None:
                session.flush()
                self._set_policy(session, class_name, policy)
        return row

    def update_class(
        self, profile: DeviceProfile, *, name: str | None = None, policy: RecompressionPolicy | None = None
    ) -> DeviceClass:
        """Replace a class's profile and its recompression policy (None removes it), in one transaction.

        The file is the truth: a speed correction the recompression loop learned from the field is replaced too.
        """
        class_name = check_name("class", name or profile.name)
        with self.db.transaction(f"updating class {class_name!r}") as session:
            row = session.get(DeviceClass, class_name, with_for_update=True)
            if row is None:
                raise NotFoundError(f"device class {class_name!r} does not exist (add it with `edgefleet class add`)")
            live = session.exec(  # its gates judge against the profile: it cannot change under a live rollout
                select(Rollout).where(Rollout.class_name == class_name, col(Rollout.state).in_(LIVE_ROLLOUT_STATES))
            ).first()
            if live is not None:
                raise ConflictError(
                    f"rollout {live.id} to class {class_name!r} is {live.state}: wait for it to finish, or abort it "
                    f"(`edgefleet rollout abort {live.id}`), then update the class"
                )
            was = json.loads(row.profile_json)
            row.profile_json = profile.model_dump_json()
            session.add(row)
            self.audit(session, "class.update", class_name, profile=profile.model_dump(mode="json"), was=was)
            if policy is not None:
                self._set_policy(session, class_name, policy)
            else:
                stored = session.get(ClassPolicy, class_name)
                if stored is not None:
                    session.delete(stored)
                    self.audit(session, "recompress.policy.remove", class_name)
        return row

    def _set_policy(self, session: Session, class_name: str, policy: RecompressionPolicy) -> None:
        row = session.get(ClassPolicy, class_name) or ClassPolicy(class_name=class_name)
        row.policy_json, row.updated_at = policy.model_dump_json(), self.clock()
        session.add(row)
        self.audit(session, "recompress.policy", class_name, policy=policy.model_dump())

    def class_policy(self, name: str) -> RecompressionPolicy | None:
        """The class's stored recompression policy, None when it has none."""
        with self.db.reading(f"reading the policy of class {name!r}") as session:
            row = session.get(ClassPolicy, name)
        return RecompressionPolicy.model_validate_json(row.policy_json) if row is not None else None

    def list_classes(self) -> list[tuple[DeviceClass, int]]:
        with self.db.reading() as session:
            counts = dict(session.exec(select(Device.class_name, func.count()).group_by(col(Device.class_name))).all())
            rows = session.exec(select(DeviceClass).order_by(col(DeviceClass.name))).all()
        return [(r, int(counts.get(r.name, 0))) for r in rows]

    def get_class(self, name: str) -> tuple[DeviceClass, DeviceProfile]:
        with self.db.reading(f"reading class {name!r}") as session:
            row = session.get(DeviceClass, name)
        if row is None:
            raise NotFoundError(f"device class {name!r} does not exist (see `edgefleet class list`)")
        return row, profile_of(row)

    # ------------------------------------------------------------------ devices
    def register_devices(self, ids: Sequence[str], *, class_name: str, fleet: str) -> list[DeviceCredential]:
        """Register all the devices or none; returns each one's secret (never stored in clear)."""
        if not ids:
            raise RegistryError("no device ids given")
        for device_id in ids:
            check_device_id(device_id)
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ConflictError(f"device ids given twice: {', '.join(dupes[:10])}")
        creds = [DeviceCredential(i, i, new_secret(), class_name, fleet) for i in ids]
        with self.db.transaction(f"registering {len(ids)} device(s)") as session:
            if session.get(DeviceClass, class_name) is None:
                raise NotFoundError(f"device class {class_name!r} does not exist (add it with `edgefleet class add`)")
            if session.get(Fleet, fleet) is None:
                raise NotFoundError(f"fleet {fleet!r} does not exist (create it with `edgefleet fleet create`)")
            taken = self._existing_ids(session, ids)
            if taken:
                raise ConflictError(f"device id(s) already registered: {', '.join(taken[:10])}; nothing was registered")
            now = self.clock()
            for cred in creds:
                session.add(
                    Device(
                        id=cred.device_id,
                        fleet=fleet,
                        class_name=class_name,
                        credential_hash=hash_secret(cred.password),
                        created_at=now,
                    )
                )
            self.audit(session, "device.register", class_name, count=len(ids), ids=list(ids[:20]), fleet=fleet)
        return creds

    @staticmethod
    def _existing_ids(session: Session, ids: Iterable[str]) -> list[str]:
        found: list[str] = []
        chunk: list[str] = []
        for device_id in [*ids, None]:
            if device_id is not None:
                chunk.append(device_id)
            if chunk and (device_id is None or len(chunk) >= 500):
                found += session.exec(select(Device.id).where(col(Device.id).in_(chunk))).all()
                chunk = []
        return sorted(found)

    def list_devices(
        self, *, class_name: str | None = None, online: bool | None = None, fleet: str | None = None
    ) -> list[Device]:
        query = select(Device).order_by(col(Device.id))
        if class_name is not None:
            query = query.where(Device.class_name == class_name)
        if online is not None:
            query = query.where(Device.online == online)
        if fleet is not None:
            query = query.where(Device.fleet == fleet)
        with self.db.reading() as session:
            return list(session.exec(query).all())

    def broker_accounts(self) -> list[tuple[str, str]]:
        """(username, `$7$` hash) of every registered device, for the broker's password file."""
        with self.db.reading() as session:
            rows = session.exec(select(Device.id, Device.credential_hash).order_by(col(Device.id))).all()
        return [(str(i), str(h)) for i, h in rows]

    def get_device(self, device_id: str) -> Device:
        with self.db.reading(f"reading device {device_id!r}") as session:
            row = session.get(Device, device_id)
        if row is None:
            raise NotFoundError(f"device {device_id!r} is not registered (see `edgefleet device list`)")
        return row

    # ------------------------------------------------------------------ models
    def add_model(self, name: str, *, source: str, task: str, file_sha256: str | None = None) -> Model:
        if not MODEL_NAME_RE.match(name):
            raise RegistryError(f"model name {name!r} is not valid: use letters, digits, '.', '-' or '_'")
        with self.db.transaction(f"adding model {name!r}") as session:
            if session.get(Model, name) is not None:
                raise ConflictError(f"model {name!r} already exists")
            row = Model(name=name, source=source, task=task, file_sha256=file_sha256, created_at=self.clock())
            session.add(row)
            self.audit(session, "model.add", name, source=source, task=task, sha256=file_sha256)
        return row

    def list_models(self) -> list[Model]:
        with self.db.reading() as session:
            return list(session.exec(select(Model).order_by(col(Model.name))).all())

    def get_model(self, name: str) -> Model:
        with self.db.reading(f"reading model {name!r}") as session:
            row = session.get(Model, name)
        if row is None:
            raise NotFoundError(f"model {name!r} does not exist (see `edgefleet model list`)")
        return row


def profile_of(row: DeviceClass) -> DeviceProfile:
    try:
        return DeviceProfile.model_validate_json(row.profile_json)
    except ValueError as exc:
        raise RegistryError(f"class {row.name!r}: the stored profile no longer validates ({exc})") from exc
