"""`edgefleet compress class MODEL --class C`: plan for a registered device class and store the pick as that
class's next signed artifact, ready for `edgefleet rollout start` (the planner's choice, its recipe and its measurements
travel in the manifest, with validation samples from the data's validation split).

    edgefleet model add digits --example digits
    edgefleet compress class digits --class rpi4 --example digits --time-budget 300
    edgefleet rollout start rpi4:1 --class rpi4       # gated waves (or `edgefleet deploy 1 --class rpi4`: at once)
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from edgefleet.controller.cli.common import fail, open_registry, settings_of
from edgefleet.controller.cli.sources import DataOpt, ExampleOpt, ModelOpt, OnnxOpt, load_model_source

__all__ = ["compress_for_class"]


def compress_for_class(  # noqa: PLR0917 - typer passes options by position
    ctx: typer.Context,
    model_name: Annotated[str, typer.Argument(help="a model added with `edgefleet model add`")],
    class_name: Annotated[str, typer.Option("--class", help="the registered device class to plan for")],
    example: ExampleOpt = None,
    model: ModelOpt = None,
    onnx_file: OnnxOpt = None,
    data: DataOpt = None,
    time_budget: Annotated[float | None, typer.Option(min=1, help="seconds; best fit so far when they run out")] = None,
    train_epochs: Annotated[int | None, typer.Option(min=1, max=1000, help="epochs to train the example")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the stored artifact as JSON")] = False,
) -> None:
    """Plan a recipe for a registered class and store the result as its next signed artifact."""
    if sum(s is not None for s in (example, model, onnx_file)) != 1:
        raise typer.BadParameter("give exactly one of --example, --model, --onnx", param_hint="--example")
    from rich.console import Console

    from edgefleet.compression import CompressionError
    from edgefleet.controller.artifacts.catalog import ArtifactCatalog
    from edgefleet.controller.artifacts.keys import load_signing_key
    from edgefleet.controller.artifacts.planned import store_planned, validation_of
    from edgefleet.controller.artifacts.store import ArtifactStore
    from edgefleet.controller.cli.plan import default_cache_dir, print_plan, run_plan
    from edgefleet.controller.errors import ControllerError
    from edgefleet.protocols.errors import ProtocolError

    try:
        settings = settings_of(ctx)
        registry = open_registry(ctx)
        registry.get_model(model_name)
        _, profile = registry.get_class(class_name)
        catalog = ArtifactCatalog(
            registry.db,
            store=ArtifactStore(settings.store_dir),
            signing_key=load_signing_key(settings.key_path),
            actor=registry.actor,
        )
        the_model, task = load_model_source(example, model, onnx_file, data, train_epochs)
        result = run_plan(the_model, task, profile, time_budget, default_cache_dir())
        if not as_json:
            print_plan(result, Console(stderr=True))
        artifact = store_planned(
            catalog, result, model_name=model_name, class_name=class_name, validation=validation_of(task)
        )
    except (ControllerError, ProtocolError, CompressionError) as exc:
        raise fail(str(exc)) from exc
    assert result.chosen is not None  # noqa: S101 - store_planned raised otherwise
    row = {"id": artifact.id, "model": model_name, "class": class_name, "version": artifact.version,
           "size": artifact.size, "sha256": artifact.sha256, "recipe": result.chosen.label,
           "binding": result.binding.value if result.binding else None}  # fmt: skip
    if as_json:
        typer.echo(json.dumps(row, indent=2))
        return
    typer.echo(
        f"artifact {artifact.id}: {model_name} for class {class_name}, version {artifact.version}, "
        f"{artifact.size} bytes, recipe {result.chosen.label}, signed; roll it out with "
        f"`edgefleet rollout start {class_name}:{artifact.version} --class {class_name}`"
    )
