"""Triton kernels with PyTorch references. Only torch and triton are imported here."""
