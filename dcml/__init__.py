"""dcml: divide-and-conquer deep metric learning as a Kubeflow pipeline."""

__version__ = "0.1.0"

import logging as _logging

# faiss logs every SIMD variant it fails to load at INFO; stage logs stay readable.
_logging.getLogger("faiss.loader").setLevel(_logging.WARNING)
