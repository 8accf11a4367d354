"""The package version: one home for ``__version__`` (read by the package, the run record and the data
cache key)."""

__version__ = "0.1.0"
