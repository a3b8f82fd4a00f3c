"""Function-level corrections that keep one codebook per layer usable on
networks with BatchNorm (MobileNet/EfficientNet style):
:func:`equalize_channels` before clustering (per-channel weight ranges made
equal, the scale moved into the BatchNorm, the float function unchanged) and
:func:`correct_bias` after it (BatchNorm running means shifted back to the
float model's activation means).
"""

from __future__ import annotations

import torch
from torch import nn

from dcml.contracts.errors import DcmlError

from ._runtime import device_of


# -- channel equalisation (function-preserving, before clustering) --------------

def conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, BatchNorm name) for every conv whose output goes straight
    into a BatchNorm with running statistics, found by running ``example``
    through the model (eval mode, no gradients) with forward hooks."""
    names = {id(m): n for n, m in model.named_modules()}
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: list[tuple[str, str]] = []
    hooks = []

    def after_conv(module, _inputs, output):
        produced[id(output)] = (names[id(module)], output)

    def before_bn(module, inputs):
        hit = produced.get(id(inputs[0]))
        if hit is not None and hit[1] is inputs[0]:
            pairs.append((hit[0], names[id(module)]))

    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            hooks.append(module.register_forward_hook(after_conv))
        elif (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine
              and module.track_running_stats and module.running_var is not None):
            hooks.append(module.register_forward_pre_hook(before_bn))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example.to(device_of(model)))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return list(dict.fromkeys(pairs))


@torch.no_grad()
def equalize_channels(model: nn.Module, example: torch.Tensor, *, rtol: float = 1e-3) -> list[str]:
    """Give every output channel of each conv that feeds a BatchNorm the same
    largest |weight|, moving the scale into the BatchNorm; returns the convs changed.

    One codebook per layer has to serve every channel of it. In depthwise and
    1x1 convs the channels' weight ranges differ by orders of magnitude, so a
    shared 16-value codebook rounds the small channels to a single value --
    and their BatchNorm, which divides by their small running std, then
    magnifies that error. A BatchNorm makes the conv's per-channel scale a free
    choice: for conv channel c scaled by a_c, the BatchNorm's running mean is
    scaled by a_c, its running variance by a_c^2, and its gamma corrected by
    sqrt(a_c^2 var + eps) / (a_c sqrt(var + eps)), which leaves the eval-mode
    output unchanged. Then every channel gets the same share of the codebook.
    The model's output on ``example`` is checked before and after; if it moved
    (a conv output that also feeds something else), the model is restored and
    a DcmlError raised.
    """
    modules = dict(model.named_modules())
    example = example.to(device_of(model))
    pairs = conv_bn_pairs(model, example)
    if not pairs:
        return []
    was_training = model.training
    model.eval()
    before = model(example)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    changed = []
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        w = conv.weight
        peak = w.reshape(w.shape[0], -1).abs().amax(dim=1).double()
        # Channels with (almost) no weights have nothing to share; leave them.
        alive = peak > peak.max() * 1e-6
        if int(alive.sum()) < 2:
            continue
        scale = torch.where(alive, peak[alive].mean() / peak.clamp_min(1e-30), torch.ones_like(peak))
        var = bn.running_var.double()
        gamma_fix = torch.sqrt(scale * scale * var + bn.eps) / (scale * torch.sqrt(var + bn.eps))
        w.mul_(scale.to(w.dtype).view(-1, *[1] * (w.dim() - 1)))
        if conv.bias is not None:
            conv.bias.mul_(scale.to(conv.bias.dtype))
        bn.weight.mul_(gamma_fix.to(bn.weight.dtype))
        bn.running_mean.mul_(scale.to(bn.running_mean.dtype))
        bn.running_var.mul_((scale * scale).to(bn.running_var.dtype))
        changed.append(conv_name)
    after = model(example)
    model.train(was_training)
    drift = float((after - before).abs().max())
    if not drift <= rtol * max(float(before.abs().max()), 1e-12):
        model.load_state_dict(saved)
        raise DcmlError(f"channel equalisation changed the model's output by {drift:.3g} on a training batch (a conv "
                        "output feeds more than its BatchNorm in this architecture); compress with --no-equalize")
    return changed


# -- bias correction (after clustering) -------------------------------------------

@torch.no_grad()
def correct_bias(model: nn.Module, reference: nn.Module, images: torch.Tensor) -> int:
    """Shift each BatchNorm's running mean by the change quantisation caused in
    the mean of its input (Nagel et al., ICCV 2019, "empirical bias correction");
    returns the number of BatchNorms corrected.

    Rounding a filter's weights changes its response to the image's average
    intensity: with zero-sum filters (edges) the output mean moves by much
    more than the output's own spread. ``reference`` (the float model, same
    architecture) is run on ``images`` to record every BatchNorm's per-channel
    input mean; then ``model`` (quantised) runs on the same images and each
    BatchNorm first moves its running mean by the difference, so layers further
    down already see the corrected activations. Eval-mode outputs on these
    images then match the float model's per-channel means at every BatchNorm.
    """
    def batchnorms(net):
        return {name: m for name, m in net.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None}

    targets: dict[str, torch.Tensor] = {}
    ours, theirs = batchnorms(model), batchnorms(reference)
    if set(ours) != set(theirs):
        raise DcmlError("bias correction needs the float model of the same architecture as the quantised one")

    def channel_mean(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1).reshape(x.shape[1], -1).mean(dim=1)

    def record(name):
        return lambda _module, inputs: targets.__setitem__(name, channel_mean(inputs[0]))

    def shift(name):
        def hook(module, inputs):
            module.running_mean.add_((channel_mean(inputs[0]) - targets[name]).to(module.running_mean.dtype))
        return hook

    for net, hook_of in ((reference, record), (model, shift)):
        hooks = [m.register_forward_pre_hook(hook_of(name)) for name, m in batchnorms(net).items()]
        was_training = net.training
        try:
            net.eval()
            net(images.to(device_of(net)))
        finally:
            for h in hooks:
                h.remove()
            net.train(was_training)
    return len(ours)
