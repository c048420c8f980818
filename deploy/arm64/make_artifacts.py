"""The controller's side of `make check-arm64` (x86): train digits, compress it four ways, sign the artifacts.

Everything goes through the controller's own code: a registry and artifact catalog in a fresh home
(`ArtifactCatalog.add_from_onnx` with the digits validation split, which builds the manifest's validation samples
and tolerances with `validation_set.build_validation` and signs it with the home's Ed25519 key). Besides the four
good artifacts (fp32, fp16 weights, int8 static QDQ, int8 dynamic) it makes four that a device must refuse:

- `other-model-samples`: another digits network (half width, trained for one epoch from another seed), signed with
  the validation samples and tolerances of the fp32 model, as a controller mixing up two builds would;
- `swapped-labels`: the fp32 model with the output rows of 0/1, 2/3 and 4/5 crossed (what training on a crossed label
  map gives), also with the fp32 model's samples: validation must fail (with its own samples it would pass);
- `tampered-bytes`: the fp32 artifact with one byte changed after signing: the block and file digests must fail;
- `tampered-manifest`: the fp32 manifest with its tolerances loosened after signing: the signature must fail.

Output (`--out DIR`, replaced): `controller.pub`, `rpi4.toml` (the device profile), `index.json` (per artifact: name,
precision, what it is, the verdict expected) and `artifacts/NAME/{model.onnx,manifest.json}`. The registry and the
private key stay in `DIR/../controller-home`, which is never copied into the chroot.

    .venv/bin/python deploy/arm64/make_artifacts.py --out build/arm64/bundle
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PROFILE_PATH = REPO / "deploy" / "profiles" / "rpi4.toml"
MODEL = "digits"

log = logging.getLogger("make_artifacts")


@dataclass(frozen=True, slots=True)
class Entry:
    """One artifact of the bundle, as index.json lists it."""

    name: str
    precision: str
    what: str
    expect: str  # "pass" (validates), "fail" (validation fails), "reject" (signature or digest refused)


def _recipe(kind: str, **options: Any) -> Any:
    from edgefleet.compression import parse_recipe

    return parse_recipe({"name": f"arm64-{kind}", "passes": [{"kind": kind, **options}]}, source=f"arm64 {kind}")


def build_models(*, epochs: int) -> tuple[dict[str, bytes], Any]:
    """The digits model as fp32, fp16, int8 static, int8 dynamic ONNX bytes, the wrong ones, and the task."""
    import torch

    from edgefleet.compression import compress
    from edgefleet.compression.examples import train_example
    from edgefleet.compression.export import compact_names, export_onnx
    from edgefleet.controller.demo.models import swap_labels

    torch.set_num_threads(2)
    module, task = train_example("digits", epochs=epochs)
    fp32 = compact_names(export_onnx(module, task.x_val[:1]))
    models = {"fp32": fp32}
    for name, recipe in (
        ("fp16", _recipe("fp16")),
        ("int8-static", _recipe("quantize_static")),
        ("int8-dynamic", _recipe("quantize_dynamic")),
    ):
        log.info("compressing: %s", name)
        models[name], _ = compress(fp32, recipe, task, latency_runs=50, rss=False)
    other, _ = train_example("digits", width=0.5, epochs=1, seed=1)
    models["other"] = compact_names(export_onnx(other, task.x_val[:1]))
    models["swapped"] = swap_labels(fp32)
    return models, task


GOOD = (
    Entry("digits-fp32", "fp32", "the trained digits CNN", "pass"),
    Entry("digits-fp16", "fp16", "fp16 weights (compression: fp16)", "pass"),
    Entry("digits-int8-static", "int8 static", "static int8, QDQ (compression: quantize_static)", "pass"),
    Entry("digits-int8-dynamic", "int8 dynamic", "dynamic int8 of Gemm (compression: quantize_dynamic)", "pass"),
)
WRONG = (
    Entry("other-model-samples", "fp32", "another digits network with the fp32 model's samples", "fail"),
    Entry("swapped-labels", "fp32", "labels 0/1, 2/3, 4/5 crossed, with the fp32 model's samples", "fail"),
    Entry("tampered-bytes", "fp32", "the fp32 artifact with one byte changed after signing", "reject"),
    Entry("tampered-manifest", "fp32", "the fp32 manifest with its tolerances loosened after signing", "reject"),
)


def _write(out: Path, name: str, model: bytes, signed_json: str) -> None:
    directory = out / "artifacts" / name
    directory.mkdir(parents=True)
    (directory / "model.onnx").write_bytes(model)
    (directory / "manifest.json").write_text(signed_json, encoding="utf-8")


def make_bundle(out: Path, *, epochs: int) -> list[Entry]:
    """Build every artifact of the bundle into `out` (emptied first) through a fresh controller home."""
    import numpy as np

    from edgefleet.controller.artifacts.catalog import ArtifactCatalog
    from edgefleet.controller.artifacts.keys import create_signing_key, public_key_path
    from edgefleet.controller.artifacts.store import ArtifactStore
    from edgefleet.controller.artifacts.validation_set import ValidationSet
    from edgefleet.controller.data.db import Database
    from edgefleet.controller.data.registry import Registry
    from edgefleet.protocols.profile import load_profile
    from edgefleet.protocols.signing import sign_manifest

    home = out.parent / "controller-home"
    for directory in (out, home):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
    models, task = build_models(epochs=epochs)
    db = Database.open(f"sqlite:///{home / 'registry.db'}")
    db.migrate()
    registry = Registry(db, actor="check-arm64")
    profile = load_profile(PROFILE_PATH)
    registry.add_class(profile)
    registry.add_model(MODEL, source="example:digits", task="classification")
    key = create_signing_key(home / "signing.key")
    catalog = ArtifactCatalog(db, store=ArtifactStore(home / "artifacts"), signing_key=key, actor="check-arm64")
    vset = ValidationSet.from_arrays(task.x_val, task.y_val)

    def add(model: bytes, filename: str) -> Any:
        path = home / filename
        path.write_bytes(model)
        return catalog.signed_manifest(
            catalog.add_from_onnx(MODEL, class_name=profile.name, onnx_path=path, validation=vset)
        )

    signed_good = []
    for entry, source in zip(GOOD, ("fp32", "fp16", "int8-static", "int8-dynamic"), strict=True):
        signed_good.append(add(models[source], f"{source}.onnx"))
        _write(out, entry.name, models[source], signed_good[-1].model_dump_json())
    reference = signed_good[0]  # the fp32 artifact
    ref = reference.manifest
    # The wrong models: each a proper catalog artifact, then given the fp32 model's samples and re-signed.
    for entry, source in zip(WRONG[:2], ("other", "swapped"), strict=True):
        own = add(models[source], f"{source}.onnx").manifest
        forged = own.model_copy(update={"validation_samples": ref.validation_samples, "tolerances": ref.tolerances})
        _write(out, entry.name, models[source], sign_manifest(forged, key).model_dump_json())
    tampered = bytearray(models["fp32"])
    tampered[len(tampered) // 2] ^= 0x01
    _write(out, WRONG[2].name, bytes(tampered), reference.model_dump_json())
    loosened = reference.model_dump(mode="json", by_alias=True)
    loosened["manifest"]["tolerances"] = {"abs_tol": 1e6, "rel_tol": 1.0, "top1_agreement": 0.0}
    _write(out, WRONG[3].name, models["fp32"], json.dumps(loosened))

    entries = [*GOOD, *WRONG]
    accuracy = float(np.mean(task.y_val == _argmax(models["fp32"], task.x_val)))
    index = {
        "model": MODEL,
        "device_class": profile.name,
        "fp32_accuracy": accuracy,
        "artifacts": [
            {**asdict(e), "bytes": (out / "artifacts" / e.name / "model.onnx").stat().st_size} for e in entries
        ],
    }
    (out / "index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    shutil.copyfile(public_key_path(home / "signing.key"), out / "controller.pub")
    shutil.copyfile(PROFILE_PATH, out / "rpi4.toml")
    db.dispose()
    return entries


def _argmax(model: bytes, x: Any) -> Any:
    from edgefleet.compression.export import run_onnx

    return run_onnx(model, x).argmax(axis=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the bundle directory (replaced)")
    parser.add_argument("--epochs", type=int, default=4, help="digits training epochs (default 4)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[make_artifacts] %(message)s")
    log.setLevel(logging.INFO)
    entries = make_bundle(args.out.resolve(), epochs=args.epochs)
    log.info("%d signed artifacts in %s", len(entries), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
