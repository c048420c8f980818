"""Fixtures of the deploy tests; the helpers live in deploykit.py (importable: this folder goes on sys.path)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
