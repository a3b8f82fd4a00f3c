"""Vectors and scores of rows with the current model: eval transform (or the fast mode's cached
activations), Recall@1 and MAP@R, on a fork of the RNG so scoring never changes what is trained."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch


class Scorer:
    def __init__(self, manifest, device, eval_batch_size: int, num_workers: int, activations=None):
        self.manifest, self.device = manifest, device
        self.batch_size, self.num_workers = int(eval_batch_size), int(num_workers)
        self.activations = activations

    def vectors(self, model, rows: pd.DataFrame, kind: str, desc: str) -> np.ndarray:
        """Features or embeddings of ``rows`` with ``model``, in eval mode."""
        from dcml.algorithm.inference import compute_vectors

        if self.activations is None:
            return compute_vectors(model, self.manifest, rows.reset_index(drop=True), kind=kind,
                                   batch_size=self.batch_size, device=self.device, num_workers=self.num_workers,
                                   desc=desc)
        array, positions, is_train = self.activations.array_of(rows["image_id"].astype(str).tolist())
        was_training = model.training
        model.eval()
        out = []
        try:
            with torch.inference_mode():
                for start in range(0, len(positions), self.batch_size):
                    chunk = positions[start:start + self.batch_size]
                    order = np.argsort(chunk)  # memory-map reads in file order
                    block = array[chunk[order], 0] if is_train else array[chunk[order]]
                    a = torch.from_numpy(np.asarray(block, dtype=np.float32)).to(self.device)
                    f = model.features_from_lower(a)
                    v = f if kind == "features" else model.embed(f)
                    part = np.empty((len(chunk), v.shape[1]), dtype=np.float32)
                    part[order] = v.float().cpu().numpy()
                    out.append(part)
        finally:
            model.train(was_training)
        dim = model.backbone.out_features if kind == "features" else model.embedding_dim
        return np.concatenate(out) if out else np.empty((0, dim), dtype=np.float32)

    def score(self, model, rows: pd.DataFrame, desc: str) -> dict:
        """R@1 and MAP@R of ``rows`` (query vs gallery when both are there, else each row vs the rest).

        Scoring is an observation: it runs on a fork of the RNG (data loaders
        draw a seed from it), so how often a run validates or draws its test
        curve never changes the model it trains.
        """
        devices = range(torch.cuda.device_count()) if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self._score_now(model, rows, desc)

    def _score_now(self, model, rows: pd.DataFrame, desc: str) -> dict:
        from dcml.algorithm.metrics import evaluate_embeddings

        splits = set(rows["split"])
        if "query" in splits and "gallery" in splits:
            query, gallery = rows[rows["split"] == "query"], rows[rows["split"] == "gallery"]
            metrics = evaluate_embeddings(self.vectors(model, query, "embedding", desc), query["label"].to_numpy(),
                                          self.vectors(model, gallery, "embedding", desc), gallery["label"].to_numpy(),
                                          ks=(1,), include=("recall", "map@r"))
        else:
            metrics = evaluate_embeddings(self.vectors(model, rows, "embedding", desc), rows["label"].to_numpy(),
                                          ks=(1,), include=("recall", "map@r"))
        return {"recall@1": float(metrics["recall@1"]), "map@r": float(metrics["map@r"])}
