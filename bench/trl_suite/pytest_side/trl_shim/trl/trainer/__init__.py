"""See ``trl/__init__.py``."""
