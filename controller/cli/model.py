"""`edgefleet model ...` and `edgefleet artifact ...`: models in the registry, signed artifacts per class."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from edgefleet.controller.artifacts.catalog import ArtifactCatalog
from edgefleet.controller.artifacts.keys import load_signing_key, write_private_file
from edgefleet.controller.artifacts.onnx_info import read_onnx_info
from edgefleet.controller.artifacts.sources import example_onnx, held_out_npz, torch_onnx
from edgefleet.controller.artifacts.store import ArtifactStore
from edgefleet.controller.artifacts.validation_set import ValidationSet
from edgefleet.controller.cli.common import JsonOpt, emit, guarded, open_registry, settings_of
from edgefleet.controller.data.tables import Artifact
from edgefleet.controller.errors import ConfigError, ConflictError

__all__ = ["artifact_app", "model_app"]

model_app = typer.Typer(help="Add models to the registry and list them.", no_args_is_help=True)
artifact_app = typer.Typer(
    help="Add, list and show signed artifacts (a model built for a class).", no_args_is_help=True
)


def _catalog(ctx: typer.Context, *, signing: bool) -> ArtifactCatalog:
    settings = settings_of(ctx)
    registry = open_registry(ctx)
    key = load_signing_key(settings.key_path) if signing else None
    return ArtifactCatalog(registry.db, store=ArtifactStore(settings.store_dir), signing_key=key, actor=registry.actor)


@model_app.command("add")
@guarded
def model_add(  # noqa: PLR0917 - typer passes options by position
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="model name")],
    onnx: Annotated[Path | None, typer.Option("--onnx", help="an ONNX model file")] = None,
    example: Annotated[str | None, typer.Option("--example", help="a shipped example: digits, vibration")] = None,
    torch_model: Annotated[str | None, typer.Option("--torch", help="module:factory of a trained torch model")] = None,
    data: Annotated[Path | None, typer.Option("--data", help=".npz data for --torch (x_val gives the input)")] = None,
    width: Annotated[float, typer.Option("--width", help="example network width")] = 1.0,
    epochs: Annotated[int | None, typer.Option("--epochs", help="example training epochs")] = None,
    task: Annotated[str, typer.Option("--task", help="what the model does, e.g. classification")] = "classification",
) -> None:
    """Add a model from an ONNX file, a shipped example (trained here) or a torch factory plus data."""
    if sum(x is not None for x in (onnx, example, torch_model)) != 1:
        raise ConfigError("give exactly one of --onnx FILE, --example NAME or --torch MODULE:FACTORY --data FILE")
    settings = settings_of(ctx)
    store = ArtifactStore(settings.store_dir)
    registry = open_registry(ctx)
    if any(m.name == name for m in registry.list_models()):  # before a minute of training, not after it
        raise ConflictError(f"model {name!r} already exists")
    if onnx is not None:
        read_onnx_info(onnx)
        digest, _ = store.put_file(onnx)
        source = f"onnx:{onnx.name}"
    else:
        if torch_model is not None:
            if data is None:
                raise ConfigError("--torch needs --data FILE.npz (its x_val gives the model's input)")
            built, source = torch_onnx(torch_model, data)
        else:
            assert example is not None  # noqa: S101 - exactly one source was given
            typer.echo(f"training the {example} example (about a minute on two cores)...", err=True)
            built, source = example_onnx(example, width=width, epochs=epochs)
        digest, _ = store.put_bytes(built)
        read_onnx_info(store.path_of(digest))
    row = registry.add_model(name, source=source, task=task, file_sha256=digest)
    typer.echo(f"model {row.name} added ({source}, sha256 {digest[:12]})")


@model_app.command("list")
@guarded
def model_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List models."""
    rows = [
        {"name": m.name, "source": m.source, "task": m.task, "sha256": m.file_sha256, "created_at": m.created_at}
        for m in open_registry(ctx).list_models()
    ]
    emit(rows, columns=["name", "source", "task", "sha256", "created_at"], as_json=as_json, title="models")


@model_app.command("samples")
@guarded
def model_samples(
    out: Annotated[Path, typer.Option("--out", help="the .npz to write (x, y); refused when it exists")],
    example: Annotated[str | None, typer.Option("--example", help="a shipped example: digits, vibration")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="your .npz with x_val, y_val")] = None,
) -> None:
    """Write the held-out inputs and labels that `edgefleet-agent simulate --dataset` replays (labelled inferences)."""
    if (example is None) == (data is None):
        raise ConfigError("give exactly one of --example NAME or --data FILE.npz")
    if out.exists():
        raise ConflictError(f"{out} exists already: choose another --out, or remove it")
    payload, count = held_out_npz(example=example, data=data)
    try:
        write_private_file(out, payload)
    except OSError as exc:
        raise ConfigError(f"cannot write {out} ({exc.strerror or exc}); nothing was written") from exc
    typer.echo(
        f"{count} labelled held-out samples written to {out}; "
        f"replay them with `edgefleet-agent simulate --dataset {out}`"
    )


@artifact_app.command("add")
@guarded
def artifact_add(  # noqa: PLR0917 - typer passes options by position
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="model name")],
    class_name: Annotated[str, typer.Option("--class", help="device class")],
    onnx: Annotated[Path | None, typer.Option("--onnx", help="ONNX file (default: the model's own file)")] = None,
    metrics: Annotated[str | None, typer.Option("--metrics", help='measured metrics, JSON {"name": number}')] = None,
    validation: Annotated[
        Path | None,
        typer.Option("--validation", help=".npz with x (N, features...) and optional y: samples the devices check"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Sign and store an ONNX file as the next artifact version of a class (no compression)."""
    vset = ValidationSet.load(validation) if validation is not None else None
    catalog = _catalog(ctx, signing=True)
    if onnx is None:
        stored = open_registry(ctx).get_model(model).file_sha256
        if stored is None:
            raise ConfigError(f"model {model} has no ONNX file of its own: pass --onnx FILE")
        onnx = catalog.store.path_of(stored)
    try:
        measured = {str(k): float(v) for k, v in json.loads(metrics).items()} if metrics else {}
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f'--metrics must be a JSON object of numbers, e.g. {{"accuracy": 0.97}} ({exc})') from exc
    artifact = catalog.add_from_onnx(model, class_name=class_name, onnx_path=onnx, metrics=measured, validation=vset)
    manifest = catalog.signed_manifest(artifact).manifest
    samples = len(manifest.validation_samples)
    if as_json:
        row = {**_artifact_row(artifact), "validation_samples": samples, "tolerances": manifest.tolerances.model_dump()}
        typer.echo(json.dumps(row, default=str, indent=2))
        return
    typer.echo(
        f"artifact {artifact.id}: {model} for class {class_name}, version {artifact.version}, "
        f"{artifact.size} bytes, sha256 {artifact.sha256[:12]}, signed by key {artifact.key_id}"
    )
    if samples:
        tol = manifest.tolerances
        typer.echo(
            f"{samples} validation samples (abs_tol {tol.abs_tol:.3g}, rel_tol {tol.rel_tol:.3g}, "
            f"top-1 agreement {tol.top1_agreement:.3g}): devices check outputs and latency before switching"
        )
    else:
        typer.echo("no validation samples (pass --validation data.npz): devices will only check that the model loads")


def _artifact_row(a: Artifact) -> dict[str, Any]:
    return {
        "id": a.id,
        "model": a.model_name,
        "class": a.class_name,
        "version": a.version,
        "size": a.size,
        "sha256": a.sha256,
        "key_id": a.key_id,
        "created_at": a.created_at.isoformat(),
    }


@artifact_app.command("list")
@guarded
def artifact_list(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option("--model", help="only this model")] = None,
    class_name: Annotated[str | None, typer.Option("--class", help="only this class")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List artifacts."""
    rows = [_artifact_row(a) for a in _catalog(ctx, signing=False).list(model=model, class_name=class_name)]
    emit(
        rows,
        columns=["id", "model", "class", "version", "size", "sha256", "key_id"],
        as_json=as_json,
        title="artifacts",
    )


@artifact_app.command("show")
@guarded
def artifact_show(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="artifact id, or class:version")],
    as_json: JsonOpt = False,
) -> None:
    """Show one artifact with its signed manifest."""
    catalog = _catalog(ctx, signing=False)
    artifact = catalog.get(ref)
    manifest = catalog.signed_manifest(artifact).manifest
    value = {
        **_artifact_row(artifact),
        "signature": artifact.signature,
        "metrics": json.loads(artifact.metrics_json),
        "recipe": json.loads(artifact.recipe_json),
        "stored": catalog.store.has(artifact.sha256),
        "manifest": manifest.model_dump(mode="json", exclude={"validation_samples", "block_sha256"}),
        "validation_samples": len(manifest.validation_samples),
        "blocks": manifest.block_total,
    }
    rows = [{"field": k, "value": v} for k, v in value.items() if k not in {"manifest", "signature"}]
    rows += [
        {"field": "expires_at", "value": manifest.expires_at},
        {"field": "block_size", "value": manifest.block_size},
    ]
    emit(rows, columns=["field", "value"], as_json=as_json, title=f"artifact {artifact.id}", json_value=value)
