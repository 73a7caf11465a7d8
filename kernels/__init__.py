"""Triton kernels, each beside its pure-torch reference, autograd.Function and benchmark."""
