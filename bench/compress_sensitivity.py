"""Which layers make low-bit weight sharing hard: quantise one group of layers at a
time and measure how far the embeddings move.

For a checkpoint and a sample of its test images: the mean cosine similarity
between the float model's embeddings and those of the model with only some
layers quantised (plain k-means, ``--bits``), for the groups all / all but
depthwise convolutions / depthwise only / all but the first conv and the head.
1.0 = unchanged; retrieval falls apart well before 0.5.

    python -m bench.compress_sensitivity --model M.pt --manifest M.parquet --dataset cars196

writes bench/results/compress_sensitivity_<dataset>.json.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import RESULTS, command_line, log, set_threads, write_result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--dataset", required=True, help="name used in the output file name")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--method", default="kmeans", choices=["uniform", "kmeans"])
    ap.add_argument("--images", type=int, default=300, help="test images sampled")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    set_threads(args.threads or None)

    from dcml import manifest as manifest_lib
    from dcml import quantize as Q
    from dcml.checkpoint import load_model
    from dcml.inference import compute_vectors

    model, _ = load_model(args.model)
    man = manifest_lib.read(args.manifest)
    test = man.split("test")
    test = test.sample(min(args.images, len(test)), random_state=0)
    reference = torch.nn.functional.normalize(torch.as_tensor(compute_vectors(model, man, test)), dim=1)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    layers = Q.quantizable_weights(model)
    depthwise = {n for n, p in layers.items() if p.dim() == 4 and p.shape[1] == 1}
    names = list(layers)
    groups = {"all": set(names), "all but depthwise": set(names) - depthwise, "depthwise only": depthwise,
              "all but first conv and last layer": set(names[1:-1])}
    quantized = Q.quantize_model(model, args.bits, args.method)
    result = {"command": command_line("bench.compress_sensitivity", argv), "dataset": args.dataset,
              "model": args.model, "bits": args.bits, "method": args.method, "images": len(test),
              "layers": len(names), "depthwise_layers": len(depthwise), "groups": []}
    for name, keep in groups.items():
        model.load_state_dict(original)
        Q.apply_quantized(model, {k: v for k, v in quantized.items() if k in keep})
        moved = torch.nn.functional.normalize(torch.as_tensor(compute_vectors(model, man, test)), dim=1)
        cos = float((moved * reference).sum(1).mean())
        result["groups"].append({"quantized": name, "layers": len(keep), "mean_cosine_to_float": round(cos, 4)})
        log(f"{name:35s} {len(keep):3d} layers  mean cos(float, {args.bits}-bit) {cos:.3f}")
    write_result(RESULTS / f"compress_sensitivity_{args.dataset}.json", result)
    return result


if __name__ == "__main__":
    main()
