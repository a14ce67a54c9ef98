"""Models, shared by both phases and the tools: finding and loading one (:mod:`.loading`), the
hooked teacher forward (:mod:`.teacher`), and layer indices, layer maps and pruning provenance
(:mod:`.layer_map`).

It stands on :mod:`unidistill.model_logits` and :mod:`unidistill.errors` only: neither phase,
nor the storage layer, nor any tool.
"""
