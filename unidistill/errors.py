"""Typed errors. Each subclasses a built-in so callers can catch either.

Messages say what was received, what was expected, and how to fix it.
"""


class UnidistillError(Exception):
    """Base class of every error raised on purpose by unidistill."""


class ConfigError(UnidistillError, ValueError):
    """A setting or an input path is invalid (raised before anything is written)."""


class DataError(UnidistillError, ValueError):
    """The text data set cannot be used (missing, empty, unknown field, too short)."""


class CacheError(UnidistillError):
    """Base class of errors about a teacher cache."""


class CacheNotFoundError(CacheError, FileNotFoundError):
    """No unidistill cache at the given path."""


class CacheIncompleteError(CacheError):
    """The cache exists but its build has not finished (status is not ``complete``)."""


class CacheMismatchError(CacheError, ValueError):
    """The cache was built with other settings, or does not fit what the caller asks of it."""



class CacheBusyError(CacheError):
    """Another build holds the cache's lease: two builders on one output would damage each other."""


class LeaseLostError(CacheError):
    """This build's lease on its cache was taken over (or could not be renewed); it stops."""


class HiddenRangeError(ConfigError):
    """Teacher hidden states beyond what the chosen storage dtype can hold."""
