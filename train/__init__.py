"""Training utilities for HART: datasets, data builders and training scripts."""
