"""The front of Winnow: the ``winnow`` CLI, the demo and the benchmarks."""
