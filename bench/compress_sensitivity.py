"""Which layers make low-bit weight sharing hard: quantise one group of layers at a
time and measure how far the embeddings move.

For a checkpoint and a sample of its test images: the mean cosine similarity
between the float model's embeddings and those of the model with only some
layers quantised (plain k-means, ``--bits``), for the groups all / all but
depthwise convolutions / depthwise only / all but the first conv and the head;
each on the plain weights, after channel equalisation, and after equalisation
plus BatchNorm bias correction (no fine-tuning anywhere). 1.0 = unchanged;
retrieval falls apart well before 0.5.

    python -m bench.compress_sensitivity --model M.pt --manifest M.parquet --dataset cars196

writes bench/results/compress_sensitivity_<dataset>.json (a table in the
data set's compression section of the report).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import RESULTS, command_line, log, set_threads, write_result
from bench.report import Results

# (result key, label in the report, equalise, bias-correct); the first keeps the key older results used.
VARIANTS = (("mean_cosine_to_float", "plain", False, False),
            ("mean_cosine_equalized", "equalised", True, False),
            ("mean_cosine_equalized_bias_corrected", "equalised + bias correction", True, True))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--dataset", required=True, help="name used in the output file name")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--method", default="kmeans", choices=["uniform", "kmeans"])
    ap.add_argument("--images", type=int, default=300, help="test images sampled")
    ap.add_argument("--calibration-images", type=int, default=256, help="train images for bias correction")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    set_threads(args.threads or None)

    import copy

    import torch

    from components.compress.stage import calibration_images, equalize_checked
    from dcml.contracts import manifest as manifest_lib
    from dcml.methods import quantize as Q
    from dcml.model_files import load_model
    from dcml.algorithm.inference import compute_vectors

    model, _ = load_model(args.model)
    man = manifest_lib.read(args.manifest)
    test = man.split("test")
    test = test.sample(min(args.images, len(test)), random_state=0)
    calibration = calibration_images(man, man.split("train"), model.config, args.calibration_images, 0)

    def embed(net):
        return torch.nn.functional.normalize(torch.as_tensor(compute_vectors(net, man, test)), dim=1)

    reference = embed(model)
    plain_state = {k: v.clone() for k, v in model.state_dict().items()}
    layers = Q.quantizable_weights(model)
    # one filter per input channel (groups == in_channels); a 1-channel stem conv is not one
    depthwise = {n for n in layers if isinstance(conv := model.get_submodule(n.rsplit(".", 1)[0]), torch.nn.Conv2d)
                 and conv.groups == conv.in_channels > 1}
    names = list(layers)
    groups = {"all": set(names), "all but depthwise": set(names) - depthwise, "depthwise only": depthwise,
              "all but first conv and last layer": set(names[1:-1])}
    result = {"command": command_line("bench.compress_sensitivity", argv), "dataset": args.dataset,
              "model": args.model, "bits": args.bits, "method": args.method, "images": len(test),
              "calibration_images": len(calibration), "layers": len(names), "depthwise_layers": len(depthwise),
              "groups": [{"quantized": name, "layers": len(keep)} for name, keep in groups.items()]}
    for key, _, equalize, correct in VARIANTS:
        model.load_state_dict(plain_state)
        if equalize:
            equalize_checked(model, calibration)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        float_model = copy.deepcopy(model)
        quantized = Q.quantize_model(model, args.bits, args.method)
        for row, keep in zip(result["groups"], groups.values()):
            model.load_state_dict(start)
            Q.apply_quantized(model, {k: v for k, v in quantized.items() if k in keep})
            if correct:
                Q.correct_bias(model, float_model, calibration)
            cos = float((embed(model) * reference).sum(1).mean())
            row[key] = round(cos, 4)
            log(f"{key:38s} {row['quantized']:35s} {len(keep):3d} layers  mean cos(float, {args.bits}-bit) {cos:.3f}")
    write_result(Path(args.out_dir) / f"compress_sensitivity_{args.dataset}.json", result)
    return result


def section(results: Results, dataset: str) -> list[str]:
    """Its part of ``dataset``'s compression section (bench_compress's report); [] if not measured."""
    sens = results.load(f"compress_sensitivity_{dataset}")
    if not sens:
        return []
    variants = [(key, label) for key, label, _, _ in VARIANTS if all(key in g for g in sens["groups"])]
    lines = ["", f"Which layers move the embeddings (`{sens['command']}`): mean cosine between the float "
             f"model's embeddings and those with only some layers at {sens['bits']} bits ({sens['method']}, "
             f"{sens['images']} test images, no fine-tuning; 1 = unchanged).", "",
             "| layers quantised | count | " + " | ".join(label for _, label in variants) + " |",
             "|---|---:|" + "---:|" * len(variants)]
    for g in sens["groups"]:
        lines.append(f"| {g['quantized']} | {g['layers']} | "
                     + " | ".join(f"{g[key]:.2f}" for key, _ in variants) + " |")
    lines += ["", "Depthwise convolutions are the most sensitive on plain weights: their channels' weight "
              "ranges differ by orders of magnitude, so one 2^B-value codebook per layer rounds the small "
              "channels to one value, and the BatchNorm that follows divides by their small running std. "
              "Channel equalisation (the scale moves into the BatchNorm) removes most of that; bias "
              "correction removes the mean shift rounding leaves in every layer."]
    return lines


if __name__ == "__main__":
    main()
