"""Experiments on top of training: the accuracy-only vs SAYO ablation and its selected-token and tile analyses."""
