"""Winnow's online role: the scorer, its HTTP API and metrics."""
