"""Knowledge distillation: a student learns the teacher's softened logits and one of its intermediate features.

Used two ways: to train a smaller student (the teacher with a fraction of its channels, pruned by L1 norm or
re-initialised), and as the recovery fine-tune after pruning or factorization (`recover`), with the recipe's input
model as the teacher.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch_pruning as tp
from torch import nn

from edgefleet.compression.errors import RecipeError
from edgefleet.compression.recipe import DistillConfig, FineTune
from edgefleet.compression.registry import ModelState, PassContext, PassOutput
from edgefleet.compression.task import Task
from edgefleet.compression.training import FitResult, LossFn, fit

__all__ = ["DistillPass", "distillation_loss", "feature_loss", "logit_loss", "recover"]

log = logging.getLogger(__name__)


def logit_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher_T || student_T) * T², with both distributions softened by temperature T (Hinton et al., 2015).

    Why multiplied by T² and not divided: the gradient of the softened KL with respect to the student's logits is
    (p_student_T - p_teacher_T) / T, and for large T those probability differences themselves shrink like 1/T, so the
    soft-target gradient scales as 1/T². Multiplying by T² restores its magnitude, so the balance against the hard-label
    cross-entropy stays the same when T changes; dividing would shrink it by T⁴ and silence the teacher exactly at the
    temperatures where its "dark knowledge" (the relative sizes of wrong-class scores) is most visible.
    """
    log_p_student = nn.functional.log_softmax(student / temperature, dim=1)
    p_teacher = nn.functional.softmax(teacher / temperature, dim=1)
    return nn.functional.kl_div(log_p_student, p_teacher, reduction="batchmean") * temperature**2


def feature_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, projection: nn.Module) -> torch.Tensor:
    """MSE between the teacher's feature and the student's feature projected to the teacher's width."""
    return nn.functional.mse_loss(projection(student_feature), teacher_feature)


@torch.no_grad()
def _teacher_outputs(
    teacher: nn.Module, task: Task, feature_at: nn.Module | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's logits (and head-input features) on the whole training set, computed once.

    The teacher is frozen and in eval mode and the data is not augmented, so these equal what it would output batch by
    batch; caching them makes distillation cost one teacher pass instead of one per epoch.
    """
    teacher.eval()
    x = torch.from_numpy(task.x_train)
    logits, features = [], []
    with _capture_input(feature_at if feature_at is not None else teacher) as seen:
        for begin in range(0, len(x), 512):
            logits.append(teacher(x[begin : begin + 512]))
            features.append(seen["x"])
    return torch.cat(logits), torch.cat(features) if feature_at is not None else None


def distillation_loss(
    teacher: nn.Module,
    task: Task,
    *,
    temperature: float,
    alpha: float,
    features: tuple[nn.Module, dict[str, torch.Tensor], nn.Module] | None = None,
    feature_weight: float = 0.0,
) -> LossFn:
    """alpha * logit_loss + (1 - alpha) * cross-entropy [+ feature_weight * feature_loss] as a training loss.

    `features` is (teacher layer, the student's captured feature (see `_capture_input`), projection): the teacher
    layer's input is matched against the projected student feature.
    """
    use_features = features is not None and feature_weight > 0
    t_logits, t_features = _teacher_outputs(teacher, task, features[0] if features and use_features else None)

    def loss(student: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        s_logits = student(x)
        value = alpha * logit_loss(s_logits, t_logits[index], temperature)
        value = value + (1 - alpha) * nn.functional.cross_entropy(s_logits, y)
        if features is not None and t_features is not None:
            value = value + feature_weight * feature_loss(features[1]["x"], t_features[index], features[2])
        return value

    return loss


def recover(model: nn.Module, task: Task, finetune: FineTune, ctx: PassContext) -> str:
    """Fine-tune `model` in place after a pass, distilling from `ctx.teacher` when asked; returns a report note."""
    loss = None
    if finetune.distill and ctx.teacher is not None:
        loss = distillation_loss(ctx.teacher, task, temperature=finetune.temperature, alpha=0.7)
    result = fit(
        model,
        task,
        epochs=finetune.epochs,
        time_budget_s=finetune.time_budget_s,
        lr=finetune.lr,
        batch_size=finetune.batch_size,
        loss_fn=loss,
        seed=ctx.seed,
        clock=ctx.clock,
    )
    how = "distilled from the input model" if loss is not None else "cross-entropy"
    budget = ", stopped by the time budget" if result.stopped_by_budget else ""
    return f"fine-tuned {result.epochs} epochs in {result.seconds:.1f} s ({how}{budget})"


def _head(model: nn.Module) -> nn.Linear | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


@contextmanager
def _capture_input(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the input of `module` (the feature the classifier head sees) on every forward pass."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        seen["x"] = inputs[0]

    handle = module.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def make_student(teacher: nn.Module, task: Task, *, width: float, init: str, seed: int) -> nn.Module:
    """The teacher with `width` of its channels (least L1 norm removed), optionally re-initialised."""
    from edgefleet.compression.prune import prune_channels

    student = copy.deepcopy(teacher)
    if width < 1.0:
        prune_channels(
            student, task, amount=1.0 - width, importance=tp.importance.GroupMagnitudeImportance(p=1), what="distill"
        )
    if init == "scratch":
        torch.manual_seed(seed)
        for module in student.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset) and module is not student:
                reset()
    return student


class DistillPass:
    """Train a narrower student from the current model; the head's input feature is matched through a projection."""

    def __init__(self, config: DistillConfig) -> None:
        self.config = config

    def apply(self, state: ModelState, task: Task, ctx: PassContext) -> PassOutput:
        if state.module is None:
            raise RecipeError("distill needs a torch model; this model is ONNX only")
        cfg = self.config
        teacher = copy.deepcopy(state.module).eval()
        student = make_student(teacher, task, width=cfg.width, init=cfg.init, seed=ctx.seed)
        for p in teacher.parameters():
            p.requires_grad = False
        t_head, s_head = _head(teacher), _head(student)
        notes = []
        use_features = cfg.feature_weight > 0 and t_head is not None and s_head is not None
        with _capture_input(s_head if use_features and s_head is not None else student) as s_seen:
            features = None
            if use_features and t_head is not None and s_head is not None:
                features = (t_head, s_seen, nn.Linear(s_head.in_features, t_head.in_features))
                notes.append(f"feature distillation at the head input ({s_head.in_features} -> {t_head.in_features})")
            loss = distillation_loss(
                teacher, task, temperature=cfg.temperature, alpha=cfg.alpha, features=features,
                feature_weight=cfg.feature_weight,
            )  # fmt: skip
            result = self._train(student, task, loss, features[2] if features is not None else None, ctx)
        params = (sum(p.numel() for p in teacher.parameters()), sum(p.numel() for p in student.parameters()))
        notes.append(f"student width {cfg.width} ({cfg.init}): parameters {params[0]} -> {params[1]}")
        notes.append(f"trained {result.epochs} epochs in {result.seconds:.1f} s")
        return PassOutput(module=student.eval(), notes=tuple(notes))

    def _train(
        self, student: nn.Module, task: Task, loss: LossFn, projection: nn.Module | None, ctx: PassContext
    ) -> FitResult:
        cfg = self.config
        return fit(
            student,
            task,
            epochs=cfg.epochs,
            time_budget_s=cfg.time_budget_s,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            loss_fn=loss,
            extra_params=projection.parameters() if projection is not None else (),
            seed=ctx.seed,
            clock=ctx.clock,
        )
