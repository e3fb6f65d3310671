"""Exceptions raised by cm3_pyg for bad input.

Every error a user can cause with their own files or settings is one of these, and its
message names the file, row or key and says what was expected.
"""

from __future__ import annotations


class CM3Error(Exception):
    """Base class of all errors raised by cm3_pyg for bad input."""


class DataFormatError(CM3Error, ValueError):
    """A data file (interactions, features, processed cache) is malformed."""


class ConfigError(CM3Error, ValueError):
    """A configuration key is unknown or has a value of the wrong type."""
