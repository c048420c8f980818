"""Artifact store, credentials and signing key: content addressing, atomic files, Mosquitto-compatible hashes."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from edgefleet.controller.artifacts.keys import create_signing_key, load_signing_key, public_raw
from edgefleet.controller.artifacts.store import ArtifactStore
from edgefleet.controller.credentials import hash_secret, new_secret, password_file_line, verify_secret
from edgefleet.controller.errors import KeyFileError, StoreError


def test_store_is_content_addressed_and_atomic(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    data = bytes(range(256)) * 300
    digest, size = store.put_bytes(data)
    assert (digest, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert store.put_bytes(data) == (digest, size)
    assert store.read(digest) == data
    assert store.read_block(digest, offset=256 * 299, size=1000) == bytes(range(256))
    assert store.verify(digest)
    assert store.path_for_sha256(digest) == store.path_of(digest)
    assert store.path_for_sha256("0" * 64) is None
    assert store.path_for_sha256("../etc/passwd") is None
    assert [p.name for p in store.path_of(digest).parent.iterdir()] == [digest]  # no temporary files left
    with pytest.raises(StoreError, match="missing"):
        store.read("1" * 64)
    with pytest.raises(StoreError, match="not a sha256"):
        store.path_of("xyz")


def test_a_corrupted_file_no_longer_verifies(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    digest, _ = store.put_bytes(b"model bytes")
    path = store.path_of(digest)
    path.chmod(0o644)
    path.write_bytes(b"model bytez")
    assert not store.verify(digest)


def test_hashes_match_mosquitto_passwd(tmp_path: Path) -> None:
    secret = new_secret()
    stored = hash_secret(secret)
    assert stored.startswith("$7$")
    assert verify_secret(secret, stored)
    assert not verify_secret(secret + "x", stored)
    assert not verify_secret(secret, "garbage")
    assert password_file_line("dev-1", stored) == f"dev-1:{stored}"
    with pytest.raises(ValueError, match="password file"):
        password_file_line("a:b", stored)
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd is not installed")
    pwfile = tmp_path / "pw"
    subprocess.run([tool, "-b", "-c", str(pwfile), "dev-1", secret], check=True, capture_output=True)
    theirs = pwfile.read_text().strip().split(":", 1)[1]
    assert verify_secret(secret, theirs)


def test_signing_key_is_created_once_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "controller.ed25519"
    key = create_signing_key(path)
    assert public_raw(create_signing_key(path)) == public_raw(key)
    assert public_raw(load_signing_key(path)) == public_raw(key)
    assert path.stat().st_mode & 0o077 == 0
    with pytest.raises(KeyFileError, match="edgefleet init"):
        load_signing_key(tmp_path / "missing")
    (tmp_path / "bad").write_text("not a key")
    with pytest.raises(KeyFileError, match="not a PEM"):
        load_signing_key(tmp_path / "bad")
