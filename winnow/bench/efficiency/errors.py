"""The benchmark's one error kind: a configuration that cannot run, said before any run starts."""


class BenchConfigError(ValueError):
    """A benchmark that cannot run as configured; the message says what to change."""
