"""The compression worker behind the recompression loop: re-plan a class's model for its updated profile, sign it.

`PlannerBuilder` is a `Builder` for `RecompressionLoop`: it loads the model and its data (a `ModelLoader` maps the
registry's model name to a torch module or ONNX bytes plus a `Task`), runs the planner against the class profile
the loop just updated from the field (e.g. its speed correction), and records the chosen ONNX model as the
class's next signed artifact, with the metrics the gates and the next trigger compare with (`accuracy`,
`predicted_p95_ms`) and validation samples from the task's validation split. torch is imported inside the call only.

Example::

    builder = PlannerBuilder(catalog, load_model=example_loader(registry), workdir=home / "work")
    loop = RecompressionLoop(db, builder=builder)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.controller.artifacts.catalog import ArtifactCatalog
from edgefleet.controller.artifacts.planned import plan_metrics, store_planned, validation_of
from edgefleet.controller.data.registry import Registry
from edgefleet.controller.errors import ControllerError, UnavailableError
from edgefleet.controller.recompress.loop import BuildRequest, BuildResult

__all__ = ["ModelLoader", "PlannerBuilder", "example_loader"]

# model name -> (an nn.Module or ONNX bytes, an edgefleet.compression Task)
ModelLoader = Callable[[str], tuple[Any, Any]]


class PlannerBuilder:
    """Plans, then signs the chosen model as the class's next artifact; raises ControllerError when nothing fits."""

    def __init__(
        self, catalog: ArtifactCatalog, *, load_model: ModelLoader, workdir: Path, options: Any | None = None
    ) -> None:
        self.catalog = catalog
        self.load_model = load_model
        self.workdir = workdir
        self.options = options

    def __call__(self, request: BuildRequest) -> BuildResult:
        try:
            from edgefleet.compression.planner import plan
        except ImportError as exc:
            raise UnavailableError(f"the compression engine is not available ({exc})") from exc
        model, task = self.load_model(request.model_name)
        result = plan(model, task, request.profile, options=self.options)
        artifact = store_planned(
            self.catalog,
            result,
            model_name=request.model_name,
            class_name=request.class_name,
            validation=validation_of(task),
            workdir=self.workdir,
        )
        chosen = result.chosen
        assert chosen is not None  # noqa: S101 - store_planned raised otherwise
        metrics = plan_metrics(chosen)
        report = {
            **metrics,
            "recipe": chosen.label,
            "binding": result.binding.value if result.binding else None,
            "speed_correction": request.profile.speed_correction,
            "seconds": result.seconds,
            "version": artifact.version,
        }
        return BuildResult(artifact.id or 0, report)


def example_loader(registry: Registry, *, epochs: int | None = None) -> ModelLoader:
    """Models added with `edgefleet model add --example NAME`: retrained from the shipped example."""

    def load(model_name: str) -> tuple[Any, Any]:
        source = registry.get_model(model_name).source
        kind, _, name = source.partition(":")
        if kind != "example":
            raise ControllerError(
                f"model {model_name} comes from {source!r}: recompression retrains shipped examples only; "
                "attach a ModelLoader for other sources"
            )
        try:
            from edgefleet.compression import examples
        except ImportError as exc:
            raise UnavailableError(f"the compression engine is not available ({exc})") from exc
        model, task = examples.train_example(name, epochs=epochs)
        return model, task

    return load
