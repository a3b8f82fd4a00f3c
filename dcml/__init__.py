"""dcml: divide-and-conquer deep metric learning as a Kubeflow pipeline."""

__version__ = "0.1.0"
