"""Shipped policy artifacts (data files only)."""
