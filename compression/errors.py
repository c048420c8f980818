"""The one error hierarchy of the compression engine: every failure a user can cause is a `CompressionError`."""

from __future__ import annotations

__all__ = [
    "CompressionError",
    "DataError",
    "ExportError",
    "ModelLoadError",
    "RecipeError",
    "UnsupportedLayerError",
    "VerificationError",
]


class CompressionError(Exception):
    """A compression job cannot go on; the message names the cause and what to do about it."""


class RecipeError(CompressionError):
    """A recipe is invalid: an impossible value, passes in an order that cannot work, a pass the model cannot take."""


class DataError(CompressionError):
    """Training or validation data is unusable: wrong shape or dtype, NaN or infinity, empty, labels out of range."""


class ModelLoadError(CompressionError):
    """A bring-your-own model (factory, torch.export program or ONNX file) cannot be loaded."""


class ExportError(CompressionError):
    """A torch model will not export to ONNX, or the exported graph fails `onnx.checker`."""


class UnsupportedLayerError(CompressionError):
    """A pass met a layer it cannot handle; `layer` names it (a module path such as `block1.conv2`)."""

    def __init__(self, message: str, *, layer: str) -> None:
        super().__init__(message)
        self.layer = layer


class VerificationError(CompressionError):
    """A pass broke the model: onnxruntime and torch disagree, or outputs are not finite. Names the layer if known."""

    def __init__(self, message: str, *, layer: str | None = None) -> None:
        super().__init__(message)
        self.layer = layer
