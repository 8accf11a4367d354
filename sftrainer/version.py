"""The package version: the one place it is written (``sftrainer --version``, the data cache's fingerprint)."""

__version__ = "0.1.0"
