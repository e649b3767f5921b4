"""The package version (one place: ``dsv3lab.__version__``, ``versions()``, the run folders)."""

__version__ = "0.1.0"
