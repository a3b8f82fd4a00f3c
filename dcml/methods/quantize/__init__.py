"""Weight sharing by 1-D clustering: each conv/linear weight tensor keeps only
2^B distinct values (a per-layer codebook) and a B-bit index per weight.
Biases, BatchNorm parameters and buffers are left in float32.

One module per concern; everything public is re-exported here, so
``from dcml.methods import quantize as Q; Q.quantize_model(...)`` works:

* :mod:`.codebooks`: which weights are quantised, the three codebook methods
  (``uniform``, ``kmeans``: Deep Compression's linear-grid k-means,
  ``loss-aware``: importance-weighted k-means after Choi et al.) on one exact
  1-D Lloyd, whole-model quantisation and reconstruction errors.
* :mod:`.corrections`: channel equalisation before clustering and BatchNorm
  bias correction after it, which keep one codebook per layer usable on
  networks with BatchNorm.
* :mod:`.importance`: the diagonal Fisher that ``loss-aware`` weights by.
* :mod:`.finetune`: centroid fine-tuning, on the metric loss or by distilling
  the float model's embeddings.
* :mod:`.storage`: bit packing and the compressed checkpoint (``format``
  ``dcml.compressed/1``); :func:`~.storage.dequantize_state_dict` turns it
  back into a normal state_dict, which is what
  ``dcml.model_files.load_model`` does for this format.
"""

from ._runtime import LossFn
from .codebooks import (
    IMPORTANCE_FLOOR,
    MAX_BITS,
    METHODS,
    MIN_BITS,
    QuantizedTensor,
    apply_quantized,
    check_bits,
    check_method,
    error_summary,
    kmeans_quantize,
    lloyd_1d,
    normalize_importance,
    quantizable_weights,
    quantize_model,
    quantize_tensor,
    reconstruction_errors,
    uniform_quantize,
)
from .corrections import conv_bn_pairs, correct_bias, equalize_channels
from .finetune import distillation_loss, finetune_centroids, float_parameters
from .importance import compute_importance
from .storage import (
    FORMAT,
    budget_bytes,
    compressed_checkpoint,
    dequantize_state_dict,
    float_size_bytes,
    pack_indices,
    save_compressed,
    unpack_indices,
)

__all__ = [
    "FORMAT", "METHODS", "QuantizedTensor", "quantizable_weights", "uniform_quantize", "kmeans_quantize",
    "lloyd_1d", "quantize_tensor", "quantize_model", "apply_quantized", "reconstruction_errors",
    "error_summary", "compute_importance", "finetune_centroids", "distillation_loss", "float_parameters",
    "conv_bn_pairs", "equalize_channels", "correct_bias", "pack_indices", "unpack_indices",
    "compressed_checkpoint", "save_compressed", "dequantize_state_dict", "float_size_bytes", "budget_bytes",
    "MIN_BITS", "MAX_BITS", "IMPORTANCE_FLOOR", "LossFn", "check_bits", "check_method", "normalize_importance",
]
