"""One teacher forward that returns exactly what the cache stores, in two steps that pipeline.

The forward itself, its hooks, top-k with tail and sampling are the hooked teacher of
:mod:`unidistill.models.teacher`; what is about storage (the cache's logit representation,
``mode``, and its hidden dtype: the arrays, their names and dtypes, refusing values float16
cannot hold) is the encode step of the codecs of :mod:`unidistill.storage.codecs`. Casts
happen on the teacher's device so only the compact results are copied to the host.

A batch is :meth:`TeacherRunner.launch`\\ ed (its ids copied in, its forward queued) and later
:meth:`TeacherRunner.collect`\\ ed (top-k + tail or draws, storage casts, copies to the host). The
build launches batch i+1 before it collects batch i, so on a GPU batch i's top-k and copy-out run
on a side stream, behind batch i's forward only, while batch i+1's forward runs. On a CPU every
step runs when called, so the order changes nothing but which batch's work comes first; the
values are the same either way (each batch is computed from its own ids and seed alone).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from unidistill.models.teacher import HookedTeacher
from unidistill.storage.codecs import hidden_codec, logit_codec_class
from unidistill.storage.codecs.tokens import STREAM, TokenCodec


@dataclass
class LaunchedBatch:
    """A batch whose forward is queued: its token arrays, seed and the forward's outputs on the
    teacher's device; on a GPU, ``ready`` is the event recorded after the forward on the main
    stream."""

    input_ids: np.ndarray
    seed: int
    final: torch.Tensor
    captured: dict[int, torch.Tensor]
    ready: torch.cuda.Event | None = None
    target_mask: np.ndarray | None = None  # packed caches (see codecs.tokens)
    document_ids: np.ndarray | None = None


class TeacherRunner(HookedTeacher):
    """Runs the teacher on batches of ids and returns numpy arrays in storage dtypes.

    ``mode`` is the cache's logit representation and ``hidden_dtype`` its hidden one (see
    :mod:`unidistill.storage.codecs`): ``topk`` (``stored_k`` ids + tail), ``topk-q8`` (the same,
    compact), ``sampled`` (``stored_k`` draws per position, seeded per call) or ``exact`` (no
    logit arrays; the final layer is among ``layers``). ``packing`` is the layout's: a packed
    batch comes with its target mask and document ids, and its segments are run apart. The
    codecs do the encoding.
    """

    def __init__(self, model, layers, stored_k: int | None, *, index_dtype: np.dtype = np.int32,
                 hidden_dtype: str = "float16", rows_per_chunk: int = 1024, mode: str = "topk",
                 tail_temperatures: tuple[float, ...] = (), packing: str = STREAM):
        codec = logit_codec_class(mode)  # an unknown mode is refused before the hooks go on
        self.mode = mode
        self.index_dtype = np.dtype(index_dtype)
        self.hidden_dtype = hidden_dtype
        self.hidden_codec = hidden_codec(hidden_dtype)
        self.token_codec = TokenCodec(packing)
        super().__init__(model, layers, stored_k, rows_per_chunk=rows_per_chunk,
                         tail_temperatures=tail_temperatures)
        # new sampled caches always store the draws' teacher log-prob (layout.sample_logp)
        self.logit_codec = codec(stored_k, int(self.head.weight.shape[0]), self.tail_temperatures,
                                 sample_logp=codec.draws, index_dtype=self.index_dtype)
        self._side_stream = None  # made on the first GPU batch

    def __call__(self, input_ids: np.ndarray, seed: int = 0, *, target_mask: np.ndarray | None = None,
                 document_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """One batch in storage dtypes; ``seed`` seeds the draws of a sampled cache;
        ``target_mask`` and ``document_ids`` (B, L) come with the rows of a packed cache."""
        return self.collect(self.launch(input_ids, seed, target_mask=target_mask,
                                        document_ids=document_ids))

    @torch.inference_mode()
    def launch(self, input_ids: np.ndarray, seed: int = 0, *, target_mask: np.ndarray | None = None,
               document_ids: np.ndarray | None = None) -> LaunchedBatch:
        """Copy the ids to the teacher's device and run (on a GPU: queue) its forward."""
        device = self.head.weight.device
        if (document_ids is not None) != self.token_codec.packed:
            raise ValueError(f"a {self.token_codec.packing} cache's batch "
                             f"{'needs' if self.token_codec.packed else 'has no'} document ids")
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64))
        docs = None if document_ids is None else torch.from_numpy(np.asarray(document_ids, dtype=np.int64))
        ready = None
        if device.type == "cuda":  # pinned, so the copy in does not wait for the previous batch
            ids = ids.pin_memory().to(device, non_blocking=True)
            docs = None if docs is None else docs.pin_memory().to(device, non_blocking=True)
            final, captured = self.forward(ids, docs)
            ready = torch.cuda.Event()
            ready.record()
        else:
            final, captured = self.forward(ids.to(device), None if docs is None else docs.to(device))
        return LaunchedBatch(np.asarray(input_ids), seed, final, captured, ready,
                             None if target_mask is None else np.asarray(target_mask),
                             None if document_ids is None else np.asarray(document_ids))

    @torch.inference_mode()
    def collect(self, batch: LaunchedBatch) -> dict[str, np.ndarray]:
        """A launched batch's arrays in storage dtypes, on the host. On a GPU the top-k (or draws),
        casts and copies run on a side stream that waits for this batch's forward only, so a
        forward launched after it keeps the GPU busy meanwhile; this returns once they are done."""
        with self._on_side_stream(batch):
            out = self.token_codec.encode(batch.input_ids, batch.target_mask, batch.document_ids)
            out.update(self.logit_codec.encode(self, batch.final, batch.seed))
            for j in self.layers:
                out.update(self.hidden_codec.encode(j, batch.captured[j]))
        return out

    def _on_side_stream(self, batch: LaunchedBatch):
        if batch.ready is None:
            return contextlib.nullcontext()
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device=batch.final.device)
        stream = self._side_stream
        stream.wait_event(batch.ready)
        for t in (batch.final, *batch.captured.values()):
            t.record_stream(stream)  # made on the main stream, last used on this one
        return torch.cuda.stream(stream)
