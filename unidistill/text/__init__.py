"""Text in, packed token ids out: data sources, built-in texts, held-out splits, packing.

Shared by the cache builder (phase one) and the tools that read text (``evaluate``,
``generate``, ``prune``, ``ablate``); it imports nothing of unidistill but
:mod:`unidistill.errors`.
"""
