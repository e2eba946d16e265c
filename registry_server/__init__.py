"""Berth registry server: an OCI Distribution v1.1 registry."""

__version__ = "0.1.0"
