"""The package version, in a module of its own: lower layers name it without importing the package root,
whose public API (cifarpress/__init__.py) reaches the top of the stack."""

__version__ = "0.1.0"
