"""Gaussian-mixture math: log-densities (gaussian), OAS shrinkage (oas), K-MLE (kmle), EM (em)."""
