"""Contracts: errors, atomic files, records, the manifest, checkpoints, parameters."""
