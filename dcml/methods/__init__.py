"""Whole methods built on the algorithm: DFML, weight quantisation."""
