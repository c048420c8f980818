"""Each technique has its real effect on a tiny model: fewer parameters, a smaller ONNX, outputs within tolerance."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgefleet.compression import (
    ActivationPruneConfig,
    DistillConfig,
    FactorizeConfig,
    FineTune,
    Fp16Config,
    MagnitudePruneConfig,
    PassConfig,
    QatConfig,
    QuantizeDynamicConfig,
    QuantizeStaticConfig,
    Recipe,
    StepReport,
    StructuredPruneConfig,
    UnsupportedLayerError,
    apply_steps,
    initial_state,
)
from edgefleet.compression.distill import logit_loss
from edgefleet.compression.export import compact_names, onnx_parameter_counts, run_onnx
from edgefleet.compression.factorize import factorize_conv, factorize_linear
from edgefleet.compression.measure import transfer_bytes
from edgefleet.compression.registry import ModelState

if TYPE_CHECKING:
    from conftest import Trained

QUICK = FineTune(epochs=1, time_budget_s=20)


def accuracy_of(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(logits.argmax(axis=1) == labels))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _run(trained: Trained, config: PassConfig) -> tuple[ModelState, StepReport, ModelState]:
    state = initial_state(trained.model, trained.task)
    (report, new), *_ = list(apply_steps(state, Recipe(passes=[config]), trained.task))
    return state, report, new


def test_magnitude_pruning_zeroes_weights_that_compress(digits: Trained) -> None:
    before, report, after = _run(digits, MagnitudePruneConfig(amount=0.6, scope="global", finetune=QUICK))
    assert after.module is not None
    weights = [m.weight for m in after.module.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros >= 0.59  # the fine-tune ran with the masks on, so pruned weights stayed zero
    assert not any(name.endswith("_mask") for name, _ in after.module.named_buffers())  # masks made permanent
    assert transfer_bytes(after.onnx) < 0.75 * transfer_bytes(before.onnx)  # zeros compress on the wire
    assert report.parameters == onnx_parameter_counts(onnx.load_from_string(before.onnx))[0]  # shapes unchanged


def test_structured_pruning_removes_channels_through_residual_and_batchnorm(digits: Trained) -> None:
    before, report, after = _run(digits, StructuredPruneConfig(amount=0.5, finetune=None))
    assert after.module is not None
    assert _params(after.module) < 0.45 * _params(digits.model)
    assert len(after.onnx) < 0.5 * len(before.onnx)
    block = after.module[3]  # the first residual block: both convs and the stem share the add's channels
    assert block.conv1.in_channels == block.conv2.out_channels == block.bn2.num_features == after.module[0].out_channels
    assert report.max_abs_diff is not None
    assert report.max_abs_diff < 1e-3


def test_activation_pruning_removes_the_least_active_channels(vibration: Trained) -> None:
    _, report, after = _run(vibration, ActivationPruneConfig(amount=0.4, criterion="apoz", finetune=QUICK))
    assert after.module is not None
    assert _params(after.module) < 0.75 * _params(vibration.model)
    assert "apoz on" in " ".join(report.notes)
    _, _, by_mean = _run(vibration, ActivationPruneConfig(amount=0.4, criterion="mean", finetune=None))
    assert by_mean.module is not None
    assert _params(by_mean.module) == _params(after.module)


def test_structured_pruning_names_a_layer_it_cannot_handle(digits: Trained) -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.gain

    model = nn.Sequential(Scale(), *list(digits.model.children()))
    state = initial_state(model.eval(), digits.task)
    with pytest.raises(UnsupportedLayerError, match="layer '0' of type Scale") as info:
        list(apply_steps(state, Recipe(passes=[StructuredPruneConfig()]), digits.task))
    assert info.value.layer == "0"


def test_distillation_trains_a_narrower_student(digits: Trained) -> None:
    _, report, after = _run(digits, DistillConfig(width=0.5, epochs=3, lr=1e-2, batch_size=32, time_budget_s=30))
    assert after.module is not None
    assert _params(after.module) < 0.4 * _params(digits.model)
    assert report.accuracy > 0.5  # 10 classes: a student that learned nothing scores about 0.1
    assert any("feature distillation" in n for n in report.notes)


def test_logit_loss_is_zero_for_equal_logits_and_scaled_by_t_squared() -> None:
    logits = torch.randn(16, 10)
    assert float(logit_loss(logits, logits, 4.0)) == pytest.approx(0.0, abs=1e-6)
    other = logits + torch.randn(16, 10)
    soft = nn.functional.kl_div(
        nn.functional.log_softmax(logits / 4, 1), nn.functional.softmax(other / 4, 1), reduction="batchmean"
    )
    assert float(logit_loss(logits, other, 4.0)) == pytest.approx(16 * float(soft), rel=1e-5)


def test_full_rank_factorizations_are_exact() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(24, 16)
    x = torch.randn(5, 24)
    torch.testing.assert_close(factorize_linear(linear, rank=16)(x), linear(x), atol=1e-5, rtol=1e-4)
    conv = nn.Conv2d(6, 8, 3, padding=1, stride=2)
    image = torch.randn(2, 6, 9, 9)
    torch.testing.assert_close(factorize_conv(conv, ranks=(8, 6))(image), conv(image), atol=1e-5, rtol=1e-4)
    conv1d = nn.Conv1d(4, 6, 5, padding=2)
    signal = torch.randn(2, 4, 30)
    torch.testing.assert_close(factorize_conv(conv1d, ranks=(6, 4))(signal), conv1d(signal), atol=1e-5, rtol=1e-4)


def test_factorization_shrinks_convolutions_and_linears(digits: Trained, mlp: Trained) -> None:
    _, report, after = _run(digits, FactorizeConfig(energy=None, target_ratio=0.5, min_params=500, finetune=QUICK))
    assert after.module is not None
    assert _params(after.module) < 0.8 * _params(digits.model)
    assert "factorized" in report.notes[0]
    _, _, flat = _run(mlp, FactorizeConfig(energy=0.8, layers="linear", finetune=None))
    assert flat.module is not None
    assert _params(flat.module) < 0.9 * _params(mlp.model)


def test_factorize_refuses_grouped_convolutions(digits: Trained) -> None:
    model = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1, groups=4))
    model = nn.Sequential(*model, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    state = initial_state(model, digits.task)
    with pytest.raises(UnsupportedLayerError, match="grouped convolution '1'"):
        list(apply_steps(state, Recipe(passes=[FactorizeConfig(min_params=100)]), digits.task))


@pytest.mark.parametrize("calibration", ["minmax", "entropy", "percentile"])
def test_static_int8_is_smaller_and_agrees(digits: Trained, calibration: str) -> None:
    config = QuantizeStaticConfig(calibration=calibration, calibration_samples=64)  # type: ignore[arg-type]
    before, report, after = _run(digits, config)
    assert len(after.onnx) < 0.5 * len(compact_names(before.onnx))
    assert after.module is None
    ops = {n.op_type for n in onnx.load_from_string(after.onnx).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert report.prediction_agreement is not None
    assert report.prediction_agreement >= 0.9


def test_dynamic_int8_shrinks_a_linear_model(mlp: Trained, digits: Trained) -> None:
    before, report, after = _run(mlp, QuantizeDynamicConfig())
    assert len(after.onnx) < 0.4 * len(before.onnx)
    assert accuracy_of(run_onnx(after.onnx, mlp.task.x_val), mlp.task.y_val) >= report.accuracy - 1e-9
    _, conv_report, _ = _run(digits, QuantizeDynamicConfig())
    assert any("use quantize_static" in note for note in conv_report.notes)  # says when it cannot help


def test_fp16_weights_halve_the_file_and_keep_outputs(digits: Trained) -> None:
    before, report, after = _run(digits, Fp16Config())
    assert len(after.onnx) < 0.6 * len(before.onnx)
    assert report.max_abs_diff is not None
    assert report.max_abs_diff < 0.05
    np.testing.assert_array_equal(
        run_onnx(after.onnx, digits.task.x_val).argmax(1)[:50], run_onnx(before.onnx, digits.task.x_val).argmax(1)[:50]
    )


def test_qat_exports_qdq_with_int8_weights(digits: Trained) -> None:
    before, report, after = _run(digits, QatConfig(epochs=1, calibration_samples=64))
    graph = onnx.load_from_string(after.onnx).graph
    assert any(i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4 for i in graph.initializer)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    assert len(after.onnx) < 0.5 * len(before.onnx)
    assert report.prediction_agreement is not None
    assert report.prediction_agreement >= 0.8


def test_static_int8_falls_back_to_qat_when_it_loses_too_much(digits: Trained) -> None:
    config = QuantizeStaticConfig(calibration_samples=32, max_accuracy_drop=0.0, qat=QatConfig(epochs=1))
    _, report, _ = _run(digits, config)
    joined = " ".join(report.notes)
    assert "post-training accuracy" in joined
    # With no drop allowed the PTQ result exceeds it unless int8 is exactly as accurate as fp32.
    assert "QAT fallback reached" in joined or "-> " in joined
