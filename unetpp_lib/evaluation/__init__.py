"""Scoring predictions: metrics, lesion matching, post-processing, cross-validation."""
