"""Tests of winnow.bench."""
