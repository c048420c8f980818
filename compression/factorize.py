"""Low-rank factorization: truncated SVD of Linear layers, Tucker-2 of convolutions, then a recovery fine-tune.

Linear (out x in), W = U S Vᵀ truncated to rank r becomes Linear(in, r, no bias) with weight sqrt(S_r) V_rᵀ followed by
Linear(r, out) with weight U_r sqrt(S_r) and the original bias: r(in + out) parameters instead of in·out.

Convolution W (O, I, k...) by Tucker-2 (HOSVD on the two channel modes, no HOOI refinement): U_o = the leading R_o left
singular vectors of the mode-0 unfolding (O x I·k), U_i = the leading R_i of the mode-1 unfolding (I x O·k), core
G = W x₀ U_oᵀ x₁ U_iᵀ of shape (R_o, R_i, k...). It runs as 1x1 conv I→R_i (weight U_iᵀ), the k-conv R_i→R_o with the
original stride/padding/dilation (weight G), and 1x1 conv R_o→O (weight U_o, original bias).

Ranks come from the kept energy (smallest r whose squared singular values reach `energy` of the total) or from a
size target (ranks shrunk in proportion until the factorized layer has at most `target_ratio` of the parameters).
A layer is replaced only if that saves at least `min_saving` of its parameters.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn

from edgefleet.compression.distill import recover
from edgefleet.compression.errors import RecipeError, UnsupportedLayerError
from edgefleet.compression.recipe import FactorizeConfig
from edgefleet.compression.registry import ModelState, PassContext, PassOutput
from edgefleet.compression.task import Task

__all__ = ["FactorizePass", "energy_rank", "factorize_conv", "factorize_linear"]

log = logging.getLogger(__name__)
Conv = nn.Conv1d | nn.Conv2d


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose squared singular values hold at least `energy` of the total."""
    power = singular_values.double() ** 2
    cumulative = torch.cumsum(power, 0) / power.sum().clamp_min(1e-30)
    return int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=torch.float64)).item()) + 1


def factorize_linear(layer: nn.Linear, *, rank: int) -> nn.Sequential:
    """Two Linear layers computing the rank-`rank` SVD approximation of `layer`."""
    u, s, vh = torch.linalg.svd(layer.weight.detach(), full_matrices=False)
    root = s[:rank].sqrt()
    first = nn.Linear(layer.in_features, rank, bias=False)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        first.weight.copy_(root[:, None] * vh[:rank])
        second.weight.copy_(u[:, :rank] * root[None, :])
        if layer.bias is not None and second.bias is not None:
            second.bias.copy_(layer.bias.detach())
    return nn.Sequential(first, second)


def _unfold(weight: torch.Tensor, mode: int) -> torch.Tensor:
    return weight.movedim(mode, 0).reshape(weight.shape[mode], -1)


def factorize_conv(layer: Conv, *, ranks: tuple[int, int]) -> nn.Sequential:
    """1x1 -> k -> 1x1 convolutions computing the Tucker-2 approximation of `layer` with (R_out, R_in) ranks."""
    r_out, r_in = ranks
    w = layer.weight.detach()
    u_out = torch.linalg.svd(_unfold(w, 0), full_matrices=False)[0][:, :r_out]
    u_in = torch.linalg.svd(_unfold(w, 1), full_matrices=False)[0][:, :r_in]
    core = torch.einsum("oi...,or,is->rs...", w, u_out, u_in)
    kind = type(layer)
    ones = (1,) * (w.ndim - 2)
    first = kind(layer.in_channels, r_in, 1, bias=False)
    middle = kind(
        r_in, r_out, layer.kernel_size, stride=layer.stride, padding=layer.padding,  # type: ignore[arg-type]
        dilation=layer.dilation, bias=False, padding_mode=layer.padding_mode,  # type: ignore[arg-type]
    )  # fmt: skip
    last = kind(r_out, layer.out_channels, 1, bias=layer.bias is not None)
    with torch.no_grad():
        first.weight.copy_(u_in.T.reshape(r_in, layer.in_channels, *ones))
        middle.weight.copy_(core)
        last.weight.copy_(u_out.reshape(layer.out_channels, r_out, *ones))
        if layer.bias is not None and last.bias is not None:
            last.bias.copy_(layer.bias.detach())
    return nn.Sequential(first, middle, last)


def _conv_params(o: int, i: int, k: int, ranks: tuple[int, int]) -> int:
    return i * ranks[1] + ranks[1] * ranks[0] * k + ranks[0] * o


def _conv_ranks(layer: Conv, cfg: FactorizeConfig) -> tuple[int, int]:
    w = layer.weight.detach()
    o, i, k = w.shape[0], w.shape[1], math.prod(w.shape[2:])
    if cfg.energy is not None:
        s_out = torch.linalg.svdvals(_unfold(w, 0))
        s_in = torch.linalg.svdvals(_unfold(w, 1))
        return energy_rank(s_out, cfg.energy), energy_rank(s_in, cfg.energy)
    target = (cfg.target_ratio or 1.0) * w.numel()
    scale = 1.0
    while scale > 0.01 and _conv_params(o, i, k, (math.ceil(o * scale), math.ceil(i * scale))) > target:
        scale *= 0.95
    return max(1, math.ceil(o * scale)), max(1, math.ceil(i * scale))


def _linear_rank(layer: nn.Linear, cfg: FactorizeConfig) -> int:
    if cfg.energy is not None:
        return energy_rank(torch.linalg.svdvals(layer.weight.detach()), cfg.energy)
    return max(1, int((cfg.target_ratio or 1.0) * layer.weight.numel() / (layer.in_features + layer.out_features)))


def _replacement(name: str, module: nn.Module, cfg: FactorizeConfig) -> nn.Sequential | None:
    before = module.weight.numel() if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d) else 0
    if before < cfg.min_params:
        return None
    if isinstance(module, nn.Linear) and cfg.layers in {"linear", "both"}:
        rank = _linear_rank(module, cfg)
        after = rank * (module.in_features + module.out_features)
        new: nn.Sequential | None = (
            factorize_linear(module, rank=rank) if after <= (1 - cfg.min_saving) * before else None
        )
    elif isinstance(module, nn.Conv1d | nn.Conv2d) and cfg.layers in {"conv", "both"}:
        if module.groups != 1:
            raise UnsupportedLayerError(
                f"factorize: grouped convolution {name!r} cannot be Tucker-2 factorized", layer=name
            )
        ranks = _conv_ranks(module, cfg)
        after = _conv_params(module.out_channels, module.in_channels, math.prod(module.kernel_size), ranks)
        new = factorize_conv(module, ranks=ranks) if after <= (1 - cfg.min_saving) * before else None
    else:
        return None
    log.debug("factorize %s: %s -> %s parameters (%s)", name, before, after, "kept" if new is None else "replaced")
    return new


class FactorizePass:
    """Replace every large-enough Linear/Conv by its low-rank factorization where that saves parameters."""

    def __init__(self, config: FactorizeConfig) -> None:
        self.config = config

    def apply(self, state: ModelState, task: Task, ctx: PassContext) -> PassOutput:
        if state.module is None:
            raise RecipeError("factorize needs a torch model; this model is ONNX only")
        model = copy.deepcopy(state.module).eval()
        before = sum(p.numel() for p in model.parameters())
        replaced: list[str] = []
        for name, module in list(model.named_modules()):
            new = _replacement(name, module, self.config)
            if new is None:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
            replaced.append(name)
        after = sum(p.numel() for p in model.parameters())
        if not replaced:
            return PassOutput(module=model, notes=("no layer is large enough to gain from factorization; unchanged",))
        notes = [f"factorized {len(replaced)} layers ({', '.join(replaced)}): parameters {before} -> {after}"]
        if self.config.finetune is not None:
            notes.append(recover(model, task, self.config.finetune, ctx))
        return PassOutput(module=model.eval(), notes=tuple(notes))
