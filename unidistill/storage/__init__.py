"""The teacher-cache format: layout, writer (resumable), reader, verify and info; a cache lives in
a local folder or at an fsspec URL (``s3://bucket/prefix``), see :mod:`unidistill.storage.location`."""

from unidistill.storage.layout import CacheLayout, hidden_key
from unidistill.storage.location import CacheLocation
from unidistill.storage.reader import CacheReader, decode_hidden
from unidistill.storage.verify import verify_cache
from unidistill.storage.manifest import read_manifest
from unidistill.storage.writer import CacheWriter

__all__ = ["CacheLayout", "CacheLocation", "CacheReader", "CacheWriter", "decode_hidden", "hidden_key",
           "read_manifest", "verify_cache"]
