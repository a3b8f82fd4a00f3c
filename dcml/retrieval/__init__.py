"""From a trained model to retrieval: gallery indexes, search, export, pictures.

* :mod:`dcml.retrieval.index`: a faiss index over L2-normalised gallery
  embeddings (exact inner product, or IVF / HNSW with its recall@10 against
  exact measured when built) and the index folder format: ``index.faiss``,
  ``items.parquet`` (id -> image_id, path, label, class_name), ``model.pt``
  (the model travels with the index) and ``index.json`` (metadata + record).
* :mod:`dcml.retrieval.search`: query images -> top-k gallery items, through
  the gallery's own preprocessing; query files checked (not an image,
  truncated, absurdly large) with one-line errors.
* :mod:`dcml.retrieval.export`: TorchScript / ONNX files that embed images
  without dcml, checked against the PyTorch model on real images.
* :mod:`dcml.retrieval.pictures`: retrieval grids and per-class Recall@1 from
  embeddings and a manifest (PNG / CSV files for MLflow).
"""
