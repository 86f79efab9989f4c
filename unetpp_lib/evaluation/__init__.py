"""Scoring predictions: metrics, lesion matching, post-processing, cross-validation, error maps, summaries read back."""
