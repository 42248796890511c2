"""The package version, in a module of its own so that any part of logart can read it without importing the
package's `__init__` (which imports logart.io)."""

__version__ = "0.1.0"
