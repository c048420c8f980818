"""Pruning passes: unstructured L1 magnitude (masks made permanent), structured magnitude and activation-based.

Structured passes remove whole channels/neurons through Torch-Pruning's dependency graph, so a channel removed from a
convolution is also removed from the BatchNorm after it, from the other branch of a residual add, from a
concatenation and from every layer that consumes it: the exported graph really has fewer parameters.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune

from edgefleet.compression.distill import recover
from edgefleet.compression.errors import CompressionError, RecipeError, UnsupportedLayerError
from edgefleet.compression.recipe import ActivationPruneConfig, MagnitudePruneConfig, StructuredPruneConfig
from edgefleet.compression.registry import ModelState, PassContext, PassOutput
from edgefleet.compression.task import Task

__all__ = ["ActivationPrunePass", "MagnitudePrunePass", "StructuredPrunePass", "prune_channels"]

log = logging.getLogger(__name__)

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
# Leaf modules with parameters that the dependency graph knows how to shrink.
KNOWN = (
    *PRUNABLE,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.PReLU,
    nn.Embedding,
)


def require_torch(state: ModelState, what: str) -> nn.Module:
    if state.module is None:
        raise RecipeError(f"{what} needs a torch model; this model is ONNX only")
    return state.module


def head_layers(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """Layers whose outputs are the classes: their output width must not change."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]


def check_layers(model: nn.Module, what: str) -> None:
    """Raise `UnsupportedLayerError` for a parameter-carrying leaf module that the dependency graph cannot prune."""
    for name, module in model.named_modules():
        has_own_params = any(True for _ in module.parameters(recurse=False))
        if has_own_params and not isinstance(module, KNOWN):
            raise UnsupportedLayerError(
                f"{what} cannot prune layer {name!r} of type {type(module).__name__}; "
                "add it to the pass's ignored layers or use unstructured pruning",
                layer=name,
            )


def prune_channels(
    model: nn.Module,
    task: Task,
    *,
    amount: float,
    importance: tp.importance.Importance,
    global_pruning: bool = False,
    round_to: int | None = None,
    what: str = "structured pruning",
) -> nn.Module:
    """Remove `amount` of the channels of every prunable group in place (the classifier head keeps its outputs)."""
    check_layers(model, what)
    example = torch.from_numpy(task.x_train[:2])
    model.eval()
    try:
        pruner = tp.pruner.MetaPruner(
            model,
            example,
            importance=importance,
            pruning_ratio=amount,
            global_pruning=global_pruning,
            ignored_layers=head_layers(model, task.num_classes),
            round_to=round_to,
        )
        pruner.step()
    except CompressionError:
        raise
    except Exception as exc:
        raise UnsupportedLayerError(
            f"{what} failed while tracing or pruning the model: {exc}", layer="<graph>"
        ) from exc
    return model


class MagnitudePrunePass:
    """Zero the smallest-|w| weights of Conv/Linear layers; a fine-tune (if any) runs with the masks still on."""

    def __init__(self, config: MagnitudePruneConfig) -> None:
        self.config = config

    def apply(self, state: ModelState, task: Task, ctx: PassContext) -> PassOutput:
        model = copy.deepcopy(require_torch(state, "prune_magnitude"))
        targets = [(m, "weight") for m in model.modules() if isinstance(m, PRUNABLE)]
        if not targets:
            raise UnsupportedLayerError(
                "prune_magnitude: the model has no Conv or Linear layer to prune", layer="<model>"
            )
        if self.config.scope == "global":
            prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=self.config.amount)
        else:
            for module, name in targets:
                prune.l1_unstructured(module, name, amount=self.config.amount)  # type: ignore[no-untyped-call]
        notes = []
        if self.config.finetune is not None:
            notes.append(recover(model, task, self.config.finetune, ctx))
        for module, name in targets:
            # The masks become permanent zeros in the weight tensor.
            prune.remove(module, name)  # type: ignore[no-untyped-call]
        zeros = sum(int((m.weight == 0).sum()) for m, _ in targets)
        total = sum(m.weight.numel() for m, _ in targets)
        notes.append(f"{zeros}/{total} weights are zero ({zeros / total:.0%}); shapes unchanged, zeros compress")
        return PassOutput(module=model.eval(), notes=tuple(notes))


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class StructuredPrunePass:
    """Remove the channels with the smallest L1/L2 weight norm, summed over each dependency group."""

    def __init__(self, config: StructuredPruneConfig) -> None:
        self.config = config

    def apply(self, state: ModelState, task: Task, ctx: PassContext) -> PassOutput:
        model = copy.deepcopy(require_torch(state, "prune_structured"))
        before = _count(model)
        importance = tp.importance.GroupMagnitudeImportance(p=self.config.norm)
        prune_channels(
            model,
            task,
            amount=self.config.amount,
            importance=importance,
            global_pruning=self.config.global_pruning,
            round_to=self.config.round_to,
        )
        notes = [f"parameters {before} -> {_count(model)}"]
        if self.config.finetune is not None:
            notes.append(recover(model, task, self.config.finetune, ctx))
        return PassOutput(module=model.eval(), notes=tuple(notes))


class ActivationImportance(tp.importance.Importance):  # type: ignore[misc]
    """Channel importance from activations seen on calibration data, at the inputs of the layers that consume them.

    `apoz`: importance is 1 - APoZ, the share of non-zero (post-ReLU) values a channel carries; `mean`: the mean
    absolute activation. Channels consumed by several layers (residual adds) average their scores.
    """

    def __init__(self, stats: dict[nn.Module, torch.Tensor]) -> None:
        self.stats = stats

    @torch.no_grad()
    def __call__(self, group: tp.dependency.Group) -> torch.Tensor | None:
        consumers = (tp.pruner.function.prune_conv_in_channels, tp.pruner.function.prune_linear_in_channels)
        total: torch.Tensor | None = None
        count = 0
        size = len(group[0].idxs)
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            if dep.handler not in consumers or layer not in self.stats:
                continue
            local = self.stats[layer][torch.as_tensor(idxs, dtype=torch.long)]
            total = torch.zeros(size) if total is None else total
            total.scatter_add_(0, torch.as_tensor(group[i].root_idxs, dtype=torch.long), local.float())
            count += 1
        return None if total is None else total / count


@contextmanager
def _collect_stats(model: nn.Module, criterion: str) -> Iterator[dict[nn.Module, torch.Tensor]]:
    sums: dict[nn.Module, torch.Tensor] = {}
    counts: dict[nn.Module, int] = {}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0]
        x = x.movedim(1, -1) if x.ndim > 2 else x
        flat = x.reshape(-1, x.shape[-1])
        value = (flat > 0).float().sum(0) if criterion == "apoz" else flat.abs().sum(0)
        sums[module] = sums.get(module, torch.zeros_like(value)) + value
        counts[module] = counts.get(module, 0) + flat.shape[0]

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, PRUNABLE)]
    stats: dict[nn.Module, torch.Tensor] = {}
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
        stats.update({m: sums[m] / counts[m] for m in sums})


class ActivationPrunePass:
    """Remove the channels that fire least on a calibration sample of the training data."""

    def __init__(self, config: ActivationPruneConfig) -> None:
        self.config = config

    def apply(self, state: ModelState, task: Task, ctx: PassContext) -> PassOutput:
        model = copy.deepcopy(require_torch(state, "prune_activation")).eval()
        before = _count(model)
        sample = torch.from_numpy(task.calibration(self.config.calibration_samples, seed=ctx.seed))
        with _collect_stats(model, self.config.criterion) as stats, torch.no_grad():
            for begin in range(0, len(sample), 256):
                model(sample[begin : begin + 256])
        prune_channels(
            model, task, amount=self.config.amount, importance=ActivationImportance(stats), what="activation pruning"
        )
        notes = [f"parameters {before} -> {_count(model)} ({self.config.criterion} on {len(sample)} samples)"]
        if self.config.finetune is not None:
            notes.append(recover(model, task, self.config.finetune, ctx))
        return PassOutput(module=model.eval(), notes=tuple(notes))
