"""unidistill: offline two-phase knowledge distillation for large language models.

Phase one (``unidistill cache-build``) runs the teacher once and writes its top-k log-probs and
chosen hidden states into a Zarr cache; phase two (``unidistill distill-from-cache``) trains
students from that cache without ever loading the teacher.
"""

__version__ = "0.1.0"
