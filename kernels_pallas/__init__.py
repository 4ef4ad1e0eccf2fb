"""Pallas kernels, one package per op (see README.md in this directory for the conventions)."""
