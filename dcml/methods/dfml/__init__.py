"""Deep Factorized Metric Learning (DFML, Wang et al., CVPR 2023).

Every backbone block is split losslessly into G sub-blocks whose outputs SUM
to the block's output; a router per block picks one sub-block per sample
(convolutional blocks) or per token (ViT) with a straight-through hard
one-hot. Training runs two passes over the same batch: the full model (all
sub-blocks, identical to the pretrained network before training) and the
routed model (one sub-block per block). Inference uses the full model, which
:func:`defactorize` merges back into the original architecture so a trained
DFML model is an ordinary dcml checkpoint.

Supported blocks:

- EfficientNet-Lite MBConv (``efficientnet_lite_pytorch.model.MBConvBlock``,
  no squeeze-excitation): the expanded hidden channels are split into G
  groups. Expand conv + BN + act and depthwise conv + BN + act act per
  channel, so each group is exact; the project conv is split along its input
  channels. Its BatchNorm acts on the SUM of the groups. In the full pass the
  sub-block outputs are summed before that BN (exact in train and eval mode);
  in the routed pass the BN is applied in its eval (running-statistics) form,
  an affine map ``s*y + t`` distributed as ``s*y_g + t/G`` per sub-block. With
  ``freeze_bn`` (the default for pretrained backbones) both are the same map.
- timm ViT ``Block``: attention heads split into G groups (qkv rows and proj
  columns per head group, proj bias / G) and MLP hidden units split into G
  groups (fc1 rows, fc2 columns, fc2 bias / G). The attention and the MLP
  branch each get a router (per token).

Routed execution: MBConv and ViT-MLP sub-blocks run only on the samples /
tokens routed to them (gather, run, scatter back). ViT attention computes all
head groups and masks their outputs per token, because the keys and values of
every token are needed by any query anyway. The chosen output is multiplied by
its straight-through gate (1 in value), so the router gets the gradient of the
chosen entry through the softmax Jacobian, and by ``routed_scale`` (default G,
see :func:`factorize`).

Routers are bias-free linear maps initialised from the first training batch
(:meth:`Router.data_init`) so they do not start collapsed; each call also
leaves an optional load-balancing term (:func:`balance_loss`).
"""

from __future__ import annotations

import contextlib
import copy
import sys
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dcml.contracts.errors import DcmlError

ROUTE_MODES = ("full", "routed")


# ----------------------------------------------------------------------------
# Router
# ----------------------------------------------------------------------------

def straight_through_one_hot(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard one-hot of argmax(softmax(logits)) in the forward pass, softmax gradients backward.

    Returns (gates, index): gates has the shape of ``logits`` with exactly one 1
    per row in value; index holds the chosen position.
    """
    probs = F.softmax(logits, dim=-1)
    index = probs.argmax(dim=-1)
    hard = F.one_hot(index, logits.shape[-1]).to(probs.dtype)
    # (probs - probs.detach()) is exactly 0, so the forward value is exactly one-hot.
    return hard + (probs - probs.detach()), index


class Router(nn.Module):
    """Bias-free Linear(in_features -> G) followed by a straight-through hard one-hot.

    Each call also keeps ``balance`` = G * sum_g f_g * P_g (f_g: share of rows
    sent to g, P_g: their mean softmax probability of g), the Switch-Transformer
    load-balancing term: 1 for an even spread, up to G when collapsed; its
    gradient (through P) pushes probability away from over-used sub-blocks.
    """

    def __init__(self, in_features: int, groups: int, data_init: bool = False):
        super().__init__()
        self.linear = nn.Linear(in_features, groups, bias=False)
        self.balance: torch.Tensor | None = None
        # Persistent, so a resumed run does not initialise twice.
        self.register_buffer("init_pending", torch.tensor(bool(data_init)))

    @torch.no_grad()
    def data_init(self, x: torch.Tensor) -> None:
        """Make the logits of these rows zero-mean with unit spread per sub-block.

        Block inputs share a large common component (pooled ReLU6 activations
        are all positive), so a randomly initialised router sends nearly every
        sample to the same sub-block. Projecting the batch-mean direction out of
        each router row removes it: the routing then starts from a random
        projection of how samples differ.
        """
        rows = x.detach().reshape(-1, x.shape[-1]).to(self.linear.weight.dtype)
        if rows.shape[0] < 2:
            return
        mean = rows.mean(dim=0)
        direction = mean / mean.norm().clamp_min(1e-12)
        weight = self.linear.weight
        weight -= (weight @ direction).unsqueeze(1) * direction.unsqueeze(0)
        spread = (rows @ weight.T).std(dim=0).clamp_min(1e-6)
        weight /= spread.unsqueeze(1)
        self.init_pending.fill_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and bool(self.init_pending):
            self.data_init(x)
        logits = self.linear(x)
        gates, index = straight_through_one_hot(logits)
        groups = logits.shape[-1]
        probs = F.softmax(logits, dim=-1).reshape(-1, groups)
        share = torch.bincount(index.reshape(-1), minlength=groups).to(probs.dtype) / max(probs.shape[0], 1)
        self.balance = groups * (share * probs.mean(dim=0)).sum()
        return gates, index


def group_bounds(n: int, groups: int) -> list[tuple[int, int]]:
    """Split range(n) into ``groups`` contiguous parts, sizes as even as possible."""
    if groups < 1 or n < groups:
        raise ValueError(f"cannot split {n} units into {groups} groups")
    base, extra = divmod(n, groups)
    bounds, start = [], 0
    for g in range(groups):
        stop = start + base + (1 if g < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


class _RoutedUnit(nn.Module):
    """Common state of a factorised unit: G, route mode, routing counts."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = int(groups)
        self.route_mode = "full"
        # The routed pass outputs routed_scale x the chosen sub-block (see factorize).
        self.routed_scale = float(groups)
        # How often each sub-block was chosen in routed passes (samples or tokens).
        self.register_buffer("route_counts", torch.zeros(self.groups, dtype=torch.long), persistent=False)

    @torch.no_grad()
    def _count(self, index: torch.Tensor) -> None:
        self.route_counts += torch.bincount(index.reshape(-1), minlength=self.groups).to(self.route_counts.device)


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


class FactorizedMBConv(_RoutedUnit):
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
                from efficientnet_lite_pytorch.utils import drop_connect

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

class FactorizedAttention(_RoutedUnit):
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


class FactorizedMlp(_RoutedUnit):
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


# ----------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------

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


def routed_units(model: nn.Module) -> list[tuple[str, _RoutedUnit]]:
    """(name, unit) of every unit with a router, in forward order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _RoutedUnit)]


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


def routing_counts(model: nn.Module) -> dict[str, list[int]]:
    """Samples (conv) or tokens (ViT) sent to each sub-block, per routed unit, since the last reset."""
    return {name: [int(c) for c in unit.route_counts.tolist()] for name, unit in routed_units(model)}


def reset_routing_counts(model: nn.Module) -> None:
    for _, unit in routed_units(model):
        unit.route_counts.zero_()


def routing_summary(counts: dict[str, list[int]]) -> dict:
    """Per-unit fractions and the normalised entropy of the spread (1 = even, 0 = collapsed)."""
    import math

    fractions, entropies = {}, []
    for name, row in counts.items():
        total = sum(row)
        frac = [c / total for c in row] if total else [0.0] * len(row)
        fractions[name] = [round(f, 4) for f in frac]
        if total:
            h = -sum(f * math.log(f) for f in frac if f > 0)
            entropies.append(h / math.log(len(row)))
    return {
        "fractions": fractions,
        "mean_normalized_entropy": round(sum(entropies) / len(entropies), 4) if entropies else None,
        "collapsed_units": sum(1 for row in counts.values() if sum(row) and max(row) == sum(row)),
    }


# ----------------------------------------------------------------------------
# The DFML objective
# ----------------------------------------------------------------------------

def similarity_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """KL(teacher || student) between row-wise softmaxes of the in-batch cosine similarities.

    Retrieval only uses who is near whom, so the routed embedding is asked to
    reproduce the full embedding's neighbour distribution over the batch, not
    its coordinates; the diagonal (self-similarity, always 1) is left out.
    ``teacher`` is detached here.
    """
    n = student.shape[0]
    if n < 3:
        return student.sum() * 0.0
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=student.device)
    s = F.normalize(student, dim=1)
    t = F.normalize(teacher.detach(), dim=1)
    log_q = F.log_softmax((s @ s.T)[off_diagonal].view(n, n - 1) / temperature, dim=1)
    log_p = F.log_softmax((t @ t.T)[off_diagonal].view(n, n - 1) / temperature, dim=1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def dfml_loss(metric_loss, full: torch.Tensor, routed: torch.Tensor, labels: torch.Tensor, *,
              routed_weight: float = 0.5, distill_weight: float = 0.5, temperature: float = 0.1,
              balance: torch.Tensor | None = None, balance_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """L(full) + routed_weight * L(routed) + distill_weight * KD(routed -> full.detach())
    [+ balance_weight * balance, the routers' load-balancing term (``balance_loss``)]."""
    loss_full = metric_loss(full, labels)
    loss_routed = metric_loss(routed, labels)
    distill = similarity_distillation(routed, full, temperature)
    total = loss_full + routed_weight * loss_routed + distill_weight * distill
    parts = {"loss_full": float(loss_full.detach()), "loss_routed": float(loss_routed.detach()),
             "distill": float(distill.detach())}
    if balance is not None:
        parts["balance"] = float(balance.detach())
        if balance_weight:
            total = total + balance_weight * balance
    parts["loss"] = float(total.detach())
    return total, parts
