"""The factorised blocks: an EfficientNet-Lite MBConv block or a timm ViT block
split losslessly into G routed sub-blocks whose outputs sum to the original,
each able to merge back into the original block (``merged()``); plus the
slicing helpers that cut the original weights into groups."""

from __future__ import annotations

import copy

import torch
from torch import nn

from dcml.algorithm.models import slice_bounds
from dcml.contracts.errors import DcmlError
from dcml.methods.dfml.router import Router, RoutedUnit


# ----------------------------------------------------------------------------
# Groups, and the original block kept as a template for merging back
# ----------------------------------------------------------------------------

def group_bounds(n: int, groups: int) -> list[tuple[int, int]]:
    """Split range(n) into ``groups`` contiguous parts, sizes as even as possible."""
    if groups < 1 or n < groups:
        raise ValueError(f"cannot split {n} units into {groups} groups")
    return slice_bounds(n, groups)


def _template(module: nn.Module) -> nn.Module:
    return module.__dict__["_template"]


def _keep_template(unit: nn.Module, original: nn.Module) -> None:
    # Kept outside the module tree (no parameters, not in state_dict): only its
    # structure is used, to rebuild the original block in merged().
    unit.__dict__["_template"] = original


def _restore(template: nn.Module, state: dict, like: torch.Tensor, training: bool) -> nn.Module:
    block = copy.deepcopy(template)
    block.load_state_dict(state, strict=True)
    block.to(device=like.device)
    block.train(training)
    return block


# ----------------------------------------------------------------------------
# Tensor slicing helpers
# ----------------------------------------------------------------------------

def _param(tensor: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone(), requires_grad=like.requires_grad)


def split_bias(bias: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """``groups`` parts of about bias/G whose left-to-right sum is exactly ``bias``.

    The last part is bias minus the others; that subtraction (about b - 2b/3)
    is exact in floating point (Sterbenz), so merging restores every bit.
    """
    parts = [bias / groups for _ in range(groups - 1)]
    parts.append(bias - sum(parts))
    return parts


def _sliced_linear(linear: nn.Linear, rows: slice | torch.Tensor = slice(None), cols: slice = slice(None),
                   bias: torch.Tensor | None = None) -> nn.Linear:
    """A Linear holding ``linear``'s weight[rows][:, cols] and ``bias`` (default: bias[rows])."""
    weight = linear.weight[rows][:, cols]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    new.weight = _param(weight, linear.weight)
    if linear.bias is not None:
        new.bias = _param(linear.bias[rows] if bias is None else bias, linear.bias)
    return new


def _sliced_conv(conv: nn.Conv2d, weight: torch.Tensor, groups: int) -> nn.Conv2d:
    # A copy keeps the conv's class (TF-"SAME" padding of efficientnet-lite-pytorch).
    new = copy.deepcopy(conv)
    new.weight = _param(weight, conv.weight)
    new.out_channels = weight.shape[0]
    new.in_channels = weight.shape[1] * groups
    new.groups = groups
    return new


def _sliced_bn(bn: nn.BatchNorm2d, start: int, stop: int) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(stop - start, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                         track_running_stats=bn.track_running_stats,
                         device=bn.weight.device if bn.affine else None)
    with torch.no_grad():
        if bn.affine:
            new.weight = _param(bn.weight[start:stop], bn.weight)
            new.bias = _param(bn.bias[start:stop], bn.bias)
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean[start:stop])
            new.running_var.copy_(bn.running_var[start:stop])
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def _bn_state(parts: list[nn.BatchNorm2d]) -> dict:
    state = {}
    for key in ("weight", "bias", "running_mean", "running_var"):
        values = [getattr(p, key) for p in parts]
        if values[0] is not None:
            state[key] = torch.cat([v.detach() for v in values])
    if parts[0].num_batches_tracked is not None:
        state["num_batches_tracked"] = max(p.num_batches_tracked for p in parts).clone()
    return state


def _prefixed(prefix: str, state: dict) -> dict:
    return {f"{prefix}.{k}": v for k, v in state.items()}


# ----------------------------------------------------------------------------
# EfficientNet-Lite MBConv
# ----------------------------------------------------------------------------

class MBConvSubBlock(nn.Module):
    """One group of an MBConv block's hidden channels: expand -> depthwise -> project (before the project BN)."""

    def __init__(self, block: nn.Module, start: int, stop: int):
        super().__init__()
        # Without an expand conv the hidden channels are the input channels.
        self.input_slice = None if block._block_args.expand_ratio != 1 else (start, stop)
        if self.input_slice is None:
            self.expand_conv = _sliced_conv(block._expand_conv, block._expand_conv.weight[start:stop], 1)
            self.bn0 = _sliced_bn(block._bn0, start, stop)
        self.depthwise_conv = _sliced_conv(block._depthwise_conv, block._depthwise_conv.weight[start:stop], stop - start)
        self.bn1 = _sliced_bn(block._bn1, start, stop)
        self.project_conv = _sliced_conv(block._project_conv, block._project_conv.weight[:, start:stop], 1)
        self.act = copy.deepcopy(block._swish)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_slice is None:
            x = self.act(self.bn0(self.expand_conv(x)))
        else:
            x = x[:, self.input_slice[0]:self.input_slice[1]]
        x = self.act(self.bn1(self.depthwise_conv(x)))
        return self.project_conv(x)


class FactorizedMBConv(RoutedUnit):
    """An EfficientNet-Lite MBConv block as G sub-blocks plus a per-sample router."""

    def __init__(self, block: nn.Module, groups: int):
        super().__init__(groups)
        if getattr(block, "has_se", False):
            raise DcmlError("dfml: MBConv blocks with squeeze-excitation cannot be factorised exactly "
                            "(SE mixes all hidden channels); use EfficientNet-Lite, which has none")
        args = block._block_args
        hidden = block._depthwise_conv.weight.shape[0]
        self.sub_blocks = nn.ModuleList(MBConvSubBlock(block, a, b) for a, b in group_bounds(hidden, groups))
        self.project_bn = block._bn2
        # The same condition as MBConvBlock.forward (stride may be a list there).
        self.has_skip = bool(block.id_skip and args.stride == 1 and args.input_filters == args.output_filters)
        weight = block._project_conv.weight
        self.router = Router(self._in_channels(block), groups, data_init=True).to(device=weight.device, dtype=weight.dtype)
        _keep_template(self, block)

    @staticmethod
    def _in_channels(block: nn.Module) -> int:
        if block._block_args.expand_ratio != 1:
            return block._expand_conv.weight.shape[1]
        return block._depthwise_conv.weight.shape[0]

    def routed_output(self, y: torch.Tensor) -> torch.Tensor:
        """One sub-block's share of the project BN, times routed_scale.

        The eval-form BN is affine, s*y + t; sub-block g's share is s*y_g + t/G
        (the G shares sum to BN(sum y)).
        """
        bn = self.project_bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        share = y * scale.view(1, -1, 1, 1) + (shift / self.groups).view(1, -1, 1, 1)
        return share * self.routed_scale

    def forward(self, inputs: torch.Tensor, drop_connect_rate: float | None = None) -> torch.Tensor:
        if self.route_mode == "routed":
            gates, index = self.router(inputs.mean(dim=(2, 3)))
            self._count(index)
            x = None
            for g, sub in enumerate(self.sub_blocks):
                rows = (index == g).nonzero(as_tuple=True)[0]
                if rows.numel() == 0:
                    continue
                y = self.routed_output(sub(inputs.index_select(0, rows)))
                y = y * gates[rows, g].view(-1, 1, 1, 1)
                if x is None:
                    x = y.new_zeros((inputs.shape[0],) + y.shape[1:])
                x = x.index_add(0, rows, y)
        else:
            x = self.project_bn(sum(sub(inputs) for sub in self.sub_blocks))
        if self.has_skip:
            if drop_connect_rate:
                from dcml.algorithm.noise import drop_connect  # per sample of the global batch

                x = drop_connect(x, p=drop_connect_rate, training=self.training)
            x = x + inputs
        return x

    def merged(self) -> nn.Module:
        """The original MBConvBlock with the sub-blocks' current weights."""
        subs = list(self.sub_blocks)
        state = {}
        if subs[0].input_slice is None:
            state["_expand_conv.weight"] = torch.cat([s.expand_conv.weight.detach() for s in subs])
            state.update(_prefixed("_bn0", _bn_state([s.bn0 for s in subs])))
        state["_depthwise_conv.weight"] = torch.cat([s.depthwise_conv.weight.detach() for s in subs])
        state.update(_prefixed("_bn1", _bn_state([s.bn1 for s in subs])))
        state["_project_conv.weight"] = torch.cat([s.project_conv.weight.detach() for s in subs], dim=1)
        state.update(_prefixed("_bn2", self.project_bn.state_dict()))
        return _restore(_template(self), state, self.project_bn.running_mean, self.training)


# ----------------------------------------------------------------------------
# timm ViT Block
# ----------------------------------------------------------------------------

class FactorizedAttention(RoutedUnit):
    """timm Attention as G head groups; per-token routing by masking the group outputs."""

    def __init__(self, attn: nn.Module, groups: int):
        super().__init__(groups)
        if getattr(attn, "gate", None) is not None or not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
            raise DcmlError("dfml: gated or scale-normed timm attention mixes heads and cannot be factorised exactly; "
                            "use a plain ViT (e.g. vit_tiny_patch16_224)")
        heads, head_dim = attn.num_heads, attn.head_dim
        if heads < groups:
            raise DcmlError(f"dfml: attention has {heads} heads, fewer than groups={groups}; use groups <= {heads}")
        dim = attn.qkv.weight.shape[1]
        qkv_rows = torch.arange(attn.qkv.weight.shape[0], device=attn.qkv.weight.device).view(3, heads, head_dim)
        self.head_bounds = group_bounds(heads, groups)
        proj_biases = split_bias(attn.proj.bias.detach(), groups) if attn.proj.bias is not None else [None] * groups
        parts = []
        for (a, b), proj_bias in zip(self.head_bounds, proj_biases):
            part = copy.deepcopy(attn)
            part.qkv = _sliced_linear(attn.qkv, rows=qkv_rows[:, a:b].reshape(-1))
            part.proj = _sliced_linear(attn.proj, cols=slice(a * head_dim, b * head_dim), bias=proj_bias)
            part.num_heads = b - a
            part.attn_dim = (b - a) * head_dim
            parts.append(part)
        self.sub_blocks = nn.ModuleList(parts)
        self.router = Router(dim, groups, data_init=True).to(device=attn.qkv.weight.device, dtype=attn.qkv.weight.dtype)
        self.head_dim = head_dim
        _keep_template(self, attn)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.route_mode != "routed":
            return sum(part(x, **kwargs) for part in self.sub_blocks)
        gates, index = self.router(x)
        self._count(index)
        outputs = torch.stack([part(x, **kwargs) for part in self.sub_blocks], dim=-1)
        return (outputs * gates.unsqueeze(-2)).sum(dim=-1) * self.routed_scale

    def merged(self) -> nn.Module:
        parts = list(self.sub_blocks)
        dim = parts[0].qkv.weight.shape[1]
        hd = self.head_dim
        state = dict(parts[0].state_dict())
        state["qkv.weight"] = torch.cat([p.qkv.weight.detach().view(3, -1, hd, dim) for p in parts], dim=1).reshape(-1, dim)
        if parts[0].qkv.bias is not None:
            state["qkv.bias"] = torch.cat([p.qkv.bias.detach().view(3, -1, hd) for p in parts], dim=1).reshape(-1)
        state["proj.weight"] = torch.cat([p.proj.weight.detach() for p in parts], dim=1)
        if parts[0].proj.bias is not None:
            state["proj.bias"] = sum(p.proj.bias.detach() for p in parts)
        return _restore(_template(self), state, parts[0].qkv.weight, self.training)


class FactorizedMlp(RoutedUnit):
    """timm Mlp with its hidden units in G groups; routed tokens run only their group."""

    def __init__(self, mlp: nn.Module, groups: int):
        super().__init__(groups)
        from timm.layers import Mlp

        if type(mlp) is not Mlp or not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.norm, nn.Identity):
            raise DcmlError(f"dfml: cannot factorise MLP {type(mlp).__name__} exactly; "
                            "only timm's plain Mlp (Linear fc1/fc2, no hidden norm) is supported")
        hidden = mlp.fc1.weight.shape[0]
        fc2_biases = split_bias(mlp.fc2.bias.detach(), groups) if mlp.fc2.bias is not None else [None] * groups
        parts = []
        for (a, b), fc2_bias in zip(group_bounds(hidden, groups), fc2_biases):
            part = copy.deepcopy(mlp)
            part.fc1 = _sliced_linear(mlp.fc1, rows=slice(a, b))
            part.fc2 = _sliced_linear(mlp.fc2, cols=slice(a, b), bias=fc2_bias)
            parts.append(part)
        self.sub_blocks = nn.ModuleList(parts)
        self.router = Router(mlp.fc1.weight.shape[1], groups, data_init=True).to(device=mlp.fc1.weight.device, dtype=mlp.fc1.weight.dtype)
        _keep_template(self, mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.route_mode != "routed":
            return sum(part(x) for part in self.sub_blocks)
        gates, index = self.router(x)
        self._count(index)
        tokens, gates, index = x.reshape(-1, x.shape[-1]), gates.reshape(-1, self.groups), index.reshape(-1)
        out = None
        for g, part in enumerate(self.sub_blocks):
            rows = (index == g).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            y = part(tokens.index_select(0, rows)) * (gates[rows, g].unsqueeze(-1) * self.routed_scale)
            if out is None:
                out = y.new_zeros((tokens.shape[0], y.shape[-1]))
            out = out.index_add(0, rows, y)
        return out.view(*x.shape[:-1], out.shape[-1])

    def merged(self) -> nn.Module:
        parts = list(self.sub_blocks)
        state = dict(parts[0].state_dict())
        state["fc1.weight"] = torch.cat([p.fc1.weight.detach() for p in parts])
        if parts[0].fc1.bias is not None:
            state["fc1.bias"] = torch.cat([p.fc1.bias.detach() for p in parts])
        state["fc2.weight"] = torch.cat([p.fc2.weight.detach() for p in parts], dim=1)
        if parts[0].fc2.bias is not None:
            state["fc2.bias"] = sum(p.fc2.bias.detach() for p in parts)
        return _restore(_template(self), state, parts[0].fc1.weight, self.training)


class FactorizedViTBlock(nn.Module):
    """timm ViT Block whose attention and MLP branches are factorised and routed."""

    def __init__(self, block: nn.Module, groups: int):
        super().__init__()
        self.norm1, self.ls1, self.drop_path1 = block.norm1, block.ls1, block.drop_path1
        self.attn = FactorizedAttention(block.attn, groups)
        self.norm2, self.ls2, self.drop_path2 = block.norm2, block.ls2, block.drop_path2
        self.mlp = FactorizedMlp(block.mlp, groups)
        _keep_template(self, block)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        # LayerScale is linear, so scaling the sum equals summing scaled sub-blocks.
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    def merged(self) -> nn.Module:
        block = copy.deepcopy(_template(self))
        for name in ("norm1", "ls1", "drop_path1", "norm2", "ls2", "drop_path2"):
            setattr(block, name, copy.deepcopy(getattr(self, name)))
        block.attn = self.attn.merged()
        block.mlp = self.mlp.merged()
        block.train(self.training)
        return block
