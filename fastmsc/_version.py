"""The package version, kept apart so modules that report it need not import the package itself."""

__version__ = "0.1.0"
