"""Whole models: factorise a model's blocks and merge them back, switch the
route mode, and reach the routers (their parameters, their load-balancing term)."""

from __future__ import annotations

import contextlib
import copy
import sys
from typing import Iterator

import torch
from torch import nn

from dcml.contracts.errors import DcmlError
from dcml.methods.dfml.blocks import FactorizedAttention, FactorizedMBConv, FactorizedMlp, FactorizedViTBlock
from dcml.methods.dfml.router import routed_units

ROUTE_MODES = ("full", "routed")


def _factorized_version(module: nn.Module, groups: int) -> nn.Module | None:
    from efficientnet_lite_pytorch.model import MBConvBlock

    if isinstance(module, MBConvBlock):
        return FactorizedMBConv(module, groups)
    # A model holding timm blocks has imported timm already; importing it here
    # for a convolutional model would cost seconds for nothing.
    vit = sys.modules.get("timm.models.vision_transformer")
    if vit is not None and type(module) is vit.Block:
        return FactorizedViTBlock(module, groups)
    return None


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def factorize(model: nn.Module, groups: int = 3, routed_scale: float | None = None) -> nn.Module:
    """A copy of ``model`` with every MBConv / ViT block split into ``groups`` routed sub-blocks.

    The copy computes the same function as ``model`` (in full mode) and keeps
    its class, so e.g. an EmbeddingModel stays an EmbeddingModel.

    ``routed_scale`` (default G) multiplies the chosen sub-block's output in the
    routed pass, making it an unbiased estimate of the full sum when the groups
    contribute alike. With 1 (the reference ViT code), every block without a
    skip connection shrinks the signal G-fold in the routed pass; EfficientNet-
    Lite0 has 7 such blocks and its routed embeddings then collapse (all
    pairwise cosines ~1).
    """
    groups = int(groups)
    if groups < 2:
        raise DcmlError(f"dfml: groups={groups}; factorising needs at least 2 sub-blocks per block")
    routed_scale = float(groups if routed_scale is None else routed_scale)
    if not routed_scale > 0:
        raise DcmlError(f"dfml: routed_scale={routed_scale} must be positive")
    model = copy.deepcopy(model)
    replaced = 0
    for name, module in list(model.named_modules()):
        if name and _is_inside_factorized(model, name):
            continue
        new = _factorized_version(module, groups)
        if new is None:
            continue
        new.train(module.training)
        for _, unit in routed_units(new):
            unit.routed_scale = routed_scale
        if not name:
            return new
        _replace(model, name, new)
        replaced += 1
    if not replaced:
        raise DcmlError(f"dfml: {type(model).__name__} has no block that can be factorised "
                        "(EfficientNet-Lite MBConv or timm ViT Block); use backbone efficientnet_lite0")
    return model


def _is_inside_factorized(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    module = model
    for part in parts[:-1]:
        module = module._modules.get(part)
        if module is None:
            return True  # an old child of a block that was already replaced
        if isinstance(module, (FactorizedMBConv, FactorizedViTBlock, FactorizedAttention, FactorizedMlp)):
            return True
    return False


def factorized_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of every factorised block, outermost level (MBConv or ViT block)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (FactorizedMBConv, FactorizedViTBlock))]


def defactorize(model: nn.Module) -> nn.Module:
    """A copy of a factorised model merged back into the original architecture (exact)."""
    balance_loss(model)  # drop any pending router term: it holds a graph, which cannot be copied
    model = copy.deepcopy(model)
    if isinstance(model, (FactorizedMBConv, FactorizedViTBlock)):
        return model.merged()
    for name, block in factorized_blocks(model):
        _replace(model, name, block.merged())
    return model


def is_factorized(model: nn.Module) -> bool:
    return bool(routed_units(model))


def set_route_mode(model: nn.Module, mode: str) -> None:
    if mode not in ROUTE_MODES:
        raise ValueError(f"route mode must be one of {ROUTE_MODES}, got {mode!r}")
    for _, unit in routed_units(model):
        unit.route_mode = mode


@contextlib.contextmanager
def route_mode(model: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Run ``model`` in ``mode`` ("full" or "routed") inside the block, then restore."""
    previous = {id(u): u.route_mode for _, u in routed_units(model)}
    set_route_mode(model, mode)
    try:
        yield model
    finally:
        for _, unit in routed_units(model):
            unit.route_mode = previous.get(id(unit), "full")


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, unit in routed_units(model) for p in unit.router.parameters()]


def balance_loss(model: nn.Module) -> torch.Tensor | None:
    """Mean load-balancing term of the routers of the last routed pass (None before one).

    Reading it clears it, so a term never outlives its pass (and its graph).
    """
    terms = []
    for _, unit in routed_units(model):
        if unit.router.balance is not None:
            terms.append(unit.router.balance)
            unit.router.balance = None
    return torch.stack(terms).mean() if terms else None
