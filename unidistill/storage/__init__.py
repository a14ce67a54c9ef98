"""The teacher-cache format: layout, writer (resumable), reader, verify and info."""

from unidistill.storage.layout import CacheLayout, hidden_key
from unidistill.storage.reader import CacheReader, decode_hidden
from unidistill.storage.verify import verify_cache
from unidistill.storage.writer import CacheWriter, read_manifest

__all__ = ["CacheLayout", "CacheReader", "CacheWriter", "decode_hidden", "hidden_key",
           "read_manifest", "verify_cache"]
