"""The package version, in a module of its own so that any layer can read it (export metadata,
the server's /info) without importing the package's face, cxrlab/__init__.py."""

__version__ = "0.1.0"
