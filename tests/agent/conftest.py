"""Fixtures of the agent tests; the helpers live in agentkit.py (importable: this folder goes on sys.path)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agentkit import Fleet, Keys, fleet_on, new_keys


@pytest.fixture
def keys() -> Keys:
    return new_keys()


@pytest.fixture
def fleet(tmp_path: Path, mqtt_broker: Any, keys: Keys) -> Iterator[Fleet]:
    with fleet_on(tmp_path, mqtt_broker.host, mqtt_broker.port, keys) as f:
        yield f
