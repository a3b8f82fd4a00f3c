"""Dataset readers: one module per dataset, each turning a dataset in its
official layout into the rows and metadata of a dcml manifest."""

from data_prep.registry import READERS, get_reader, names, read_dataset

__all__ = ["READERS", "get_reader", "names", "read_dataset"]
