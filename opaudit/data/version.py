"""The package version (kept where every layer, and the CLI's ``--version``, can read it)."""

__version__ = "0.1.0"
