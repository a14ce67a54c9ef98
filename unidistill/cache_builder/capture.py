"""One teacher forward that returns exactly what the cache stores.

The forward itself, its hooks, top-k with tail and sampling are the hooked teacher of
:mod:`unidistill.models.teacher`; what is about storage (the cache's logit representation,
``mode``, and its hidden dtype: the arrays, their names and dtypes, refusing values float16
cannot hold) is the encode step of the codecs of :mod:`unidistill.storage.codecs`. Casts
happen on the teacher's device so only the compact results are copied to the host.
"""

from __future__ import annotations

import numpy as np
import torch

from unidistill.models.teacher import HookedTeacher
from unidistill.storage.codecs import hidden_codec, logit_codec_class
from unidistill.storage.layout import INPUT_IDS


class TeacherRunner(HookedTeacher):
    """Runs the teacher on batches of ids and returns numpy arrays in storage dtypes.

    ``mode`` is the cache's logit representation and ``hidden_dtype`` its hidden one (see
    :mod:`unidistill.storage.codecs`): ``topk`` (``stored_k`` ids + tail), ``topk-q8`` (the same,
    compact), ``sampled`` (``stored_k`` draws per position, seeded per call) or ``exact`` (no
    logit arrays; the final layer is among ``layers``). The codecs do the encoding.
    """

    def __init__(self, model, layers, stored_k: int | None, *, index_dtype: np.dtype = np.int32,
                 hidden_dtype: str = "float16", rows_per_chunk: int = 1024, mode: str = "topk",
                 tail_temperatures: tuple[float, ...] = ()):
        codec = logit_codec_class(mode)  # an unknown mode is refused before the hooks go on
        self.mode = mode
        self.index_dtype = np.dtype(index_dtype)
        self.hidden_dtype = hidden_dtype
        self.hidden_codec = hidden_codec(hidden_dtype)
        super().__init__(model, layers, stored_k, rows_per_chunk=rows_per_chunk,
                         tail_temperatures=tail_temperatures)
        # new sampled caches always store the draws' teacher log-prob (layout.sample_logp)
        self.logit_codec = codec(stored_k, int(self.head.weight.shape[0]), self.tail_temperatures,
                                 sample_logp=codec.draws, index_dtype=self.index_dtype)

    @torch.inference_mode()
    def __call__(self, input_ids: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
        """One batch in storage dtypes; ``seed`` seeds the draws of a sampled cache."""
        device = self.head.weight.device
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(device)
        final, captured = self.forward(ids)
        out = {INPUT_IDS: input_ids.astype(np.int32, copy=False)}
        out.update(self.logit_codec.encode(self, final, seed))
        for j in self.layers:
            out.update(self.hidden_codec.encode(j, captured[j]))
        return out
