"""Tests of winnow.bench.efficiency (the parts of the label-efficiency bench)."""
