"""Evaluation: feature spaces, density and quality metrics, nearest neighbours, truth readers."""
