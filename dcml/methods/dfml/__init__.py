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

The package, one concern per module:

- :mod:`.router`: the straight-through one-hot, :class:`Router`, the state
  every routed unit shares (:class:`RoutedUnit`), and routing counts and
  their summary.
- :mod:`.blocks`: the factorised blocks (MBConv, ViT attention / MLP / block)
  and the helpers that slice the original weights into groups.
- :mod:`.model`: :func:`factorize` / :func:`defactorize` of whole models,
  route modes, the routers' parameters and load-balancing term.
- :mod:`.loss`: :func:`similarity_distillation` and :func:`dfml_loss`.
- :mod:`.trainer`: :class:`DFMLTrainer`, dcml's Trainer with the DFML hooks.
"""

from dcml.methods.dfml.blocks import (FactorizedAttention, FactorizedMBConv, FactorizedMlp, FactorizedViTBlock,
                                      MBConvSubBlock, group_bounds, split_bias)
from dcml.methods.dfml.loss import dfml_loss, similarity_distillation
from dcml.methods.dfml.model import (ROUTE_MODES, balance_loss, defactorize, factorize, factorized_blocks,
                                     is_factorized, route_mode, router_parameters, set_route_mode)
from dcml.methods.dfml.router import (Router, RoutedUnit, reset_routing_counts, routed_units, routing_counts,
                                      routing_summary, straight_through_one_hot)
from dcml.methods.dfml.trainer import DFMLTrainer

__all__ = [
    "DFMLTrainer",
    "FactorizedAttention",
    "FactorizedMBConv",
    "FactorizedMlp",
    "FactorizedViTBlock",
    "MBConvSubBlock",
    "ROUTE_MODES",
    "RoutedUnit",
    "Router",
    "balance_loss",
    "defactorize",
    "dfml_loss",
    "factorize",
    "factorized_blocks",
    "group_bounds",
    "is_factorized",
    "reset_routing_counts",
    "route_mode",
    "routed_units",
    "router_parameters",
    "routing_counts",
    "routing_summary",
    "set_route_mode",
    "similarity_distillation",
    "split_bias",
    "straight_through_one_hot",
]
