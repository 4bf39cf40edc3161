"""Serving the same HTTP API on more than one machine (optional extras)."""
