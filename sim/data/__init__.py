"""Vendored data samples (see README.md here for sources and licenses); read through importlib.resources."""
