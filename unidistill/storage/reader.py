"""Random access to a finished teacher cache, one sequence at a time."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.core.sync import sync as zarr_sync

from unidistill.errors import (
    CacheIncompleteError,
    CacheMismatchError,
    CacheNotFoundError,
    ConfigError,
)
from unidistill.storage.codecs.registry import hidden_codec
from unidistill.storage.codecs.sampled import counts_to_buckets, sample_kl_offset  # noqa: F401  (re-exported)
from unidistill.storage.codecs.topk import (  # noqa: F401  (re-exported: tests and benchmarks import them here)
    TAIL_APPROXIMATIONS, truncate_top_k, uniform_tail,
)
from unidistill.storage.layout import READABLE_FORMAT_VERSIONS, CacheLayout
from unidistill.storage.location import as_location
from unidistill.storage.manifest import STATUS_COMPLETE, read_manifest
from unidistill.storage.prefetch import UnitPrefetcher, check_depth
from unidistill.storage.read_through import ReadThroughStore

# Units a reader with a read-through folder copies ahead unless told otherwise (storage.prefetch).
COPY_AHEAD_UNITS = 2


def decode_hidden(a: np.ndarray, logical_dtype: str) -> torch.Tensor:
    """Hidden states from :meth:`CacheReader.read` as a torch tensor: bf16 from its raw bits,
    fp16 as stored, int8 already dequantized to fp32 by the reader (the codec's ``to_torch``)."""
    return hidden_codec(logical_dtype).to_torch(a)


def _async_array(array: zarr.Array):
    """The public ``Array.async_array`` (zarr-python #3556; the installed 3.1.6 has it); the
    private attribute it returns only on older 3.1 releases, which setup.cfg still allows."""
    if hasattr(type(array), "async_array"):
        return array.async_array
    return array._async_array


def check_format_version(manifest: dict, where, readable=READABLE_FORMAT_VERSIONS) -> None:
    """Refuse a cache whose format this unidistill cannot read (a newer one's, before its layout
    keys are looked at)."""
    version = manifest.get("format_version")
    if version not in readable:
        raise CacheMismatchError(f"cache {where} has format version {version}, this unidistill reads "
                                 f"version{'s' if len(readable) > 1 else ''} "
                                 f"{', '.join(map(str, readable))}; use the unidistill that built "
                                 "it (see the manifest's package_version), or rebuild the cache")


class CacheReader:
    """Reads sequences of a cache: ids, teacher targets and chosen hidden layers.

    Opening checks the format version and (unless ``require_complete=False``, used by
    ``cache-verify``) that the build finished.

    ``local_dir``: a folder for a read-through copy of a remote cache
    (:mod:`~unidistill.storage.read_through`): each shard file is copied whole on its first read,
    to ``<local_dir>/<content fingerprint>/``, and read from there after. ``prefetch``: shards
    (work units) to read ahead in the background (:mod:`~unidistill.storage.prefetch`); by
    default :data:`COPY_AHEAD_UNITS` with a ``local_dir``, 0 (off) without.
    """

    def __init__(self, root, *, require_complete: bool = True, local_dir=None,
                 prefetch: int | None = None):
        self.location = as_location(root)
        self.root = self.location.root  # a Path for a local cache, the URL for a remote one
        manifest = read_manifest(self.location)
        if manifest is None:
            self.location.check_container("read")  # a missing bucket says so
            raise CacheNotFoundError(f"no unidistill cache at {self.root} (no manifest found); "
                                     "check the path or URL, or build one with "
                                     "`unidistill cache-build`")
        check_format_version(manifest, self.root)
        if require_complete and manifest.get("status") != STATUS_COMPLETE:
            raise CacheIncompleteError(
                f"cache {self.root} is not complete (status {manifest.get('status')!r}); "
                "rerun the same `unidistill cache-build` command to finish it")
        self.manifest = manifest
        self.layout = CacheLayout.from_dict(manifest["layout"])
        self.local_dir = self._copy_folder(local_dir)
        default = COPY_AHEAD_UNITS if self.local_dir is not None else 0
        self.prefetch = check_depth(default if prefetch is None else prefetch)
        self._group = None
        self._group_pid = None
        self._opened = None
        self._read_through = None
        self._prefetcher = None

    def _copy_folder(self, local_dir):
        """Where this cache's read-through copy lives (None: no copy), after the checks."""
        if local_dir is None:
            return None
        if self.location.is_local:
            raise ConfigError(f"a read-through folder ({local_dir}) was given for cache {self.root}, "
                              "which is a local folder already: there is nothing to copy. Drop "
                              "the folder (--cache-local-dir) for a local cache")
        fingerprint = self.manifest.get("fingerprint")
        if not fingerprint:
            raise ConfigError(f"cache {self.root} has no content fingerprint (status "
                              f"{self.manifest.get('status')!r}); a read-through copy is named by "
                              "it, so only a complete cache can be read through a local folder")
        folder = Path(local_dir).expanduser()
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"read-through folder {folder} is a file; expected a folder (it is "
                              "created if missing) for the local copies of remote shards")
        return folder / fingerprint

    @property
    def group(self) -> zarr.Group:
        # Opened lazily, and again in each process: a reader pickled into DataLoader workers (or
        # inherited through fork) opens its own store there; a remote store's client cannot
        # cross a fork.
        if self._group is None or self._group_pid != os.getpid():
            store = self.location.zarr_store("r")
            self._read_through = None
            if self.local_dir is not None:
                store = self._read_through = ReadThroughStore(store, self.local_dir)
            self._group = self.location.open_group(mode="r", store=store)
            self._group_pid = os.getpid()
            self._opened = None  # arrays of another process's group
            self._prefetcher = UnitPrefetcher(self, self.prefetch) if self.prefetch else None
        return self._group

    @property
    def read_through(self) -> ReadThroughStore | None:
        """This process's read-through store (None without a ``local_dir``)."""
        self.group  # noqa: B018  (made with the group, in each process)
        return self._read_through

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_group=None, _group_pid=None, _opened=None, _read_through=None,
                     _prefetcher=None)
        return state

    def __len__(self) -> int:
        return self.layout.n_sequences

    @property
    def layers(self) -> tuple[int, ...]:
        return self.layout.layers

    @property
    def logits_mode(self) -> str:
        return self.layout.logits_mode

    @property
    def final_layer(self) -> int:
        """The teacher's last ``hidden_states`` index (its final normed state)."""
        return int(self.manifest["settings"]["teacher"]["n_layers"])

    def head(self, device="cpu"):
        """The teacher's output head of an exact-logits cache on ``device``: (weight (V, D), bias
        or None, :class:`~unidistill.model_logits.LogitTransform`); the teacher's logits are
        ``transform(final_hidden @ weight.T + bias)`` (see :func:`~unidistill.storage.head.read_logit_transform`)."""
        from unidistill.storage.head import read_head, read_logit_transform

        if not self.layout.logit_codec.has_head:
            raise CacheMismatchError(f"cache {self.root} stores {self.logits_mode} logits, not the "
                                     "teacher's head; only an exact-logits cache has one")
        transform = read_logit_transform(self.manifest, self.root)
        return (*read_head(self.location, device), transform)

    def check_request(self, layers=None, kd_top_k: int | None = None, temperature: float = 1.0,
                      tail_approximation: str | None = None) -> bool:
        """Refuse what this cache cannot serve; True when the tail at ``temperature`` will come
        from ``tail_approximation`` rather than from the cache (see :meth:`check_temperature`)."""
        missing = [j for j in (layers or ()) if j not in self.layout.layers]
        if missing:
            raise CacheMismatchError(f"teacher layers {missing} are not in cache {self.root}; it "
                                     f"holds layers {list(self.layout.layers)}")
        self.check_kd_top_k(kd_top_k)
        return self.check_temperature(temperature, tail_approximation)

    def check_kd_top_k(self, kd_top_k: int | None) -> None:
        """The one check of a training top-k (``kd_top_k``, ``--top-k`` of distill-from-cache)
        against what the cache holds: a top-k cache, and 1 <= kd_top_k <= its ``stored_k``."""
        if kd_top_k is not None:
            self.layout.logit_codec.check_kd_top_k(kd_top_k, self.root)

    def check_temperature(self, temperature: float, tail_approximation: str | None = None) -> bool:
        """Refuse a KD temperature whose teacher distribution this cache cannot give exactly,
        unless a tail approximation is asked for; True when that approximation will be used."""
        if tail_approximation is not None and tail_approximation not in TAIL_APPROXIMATIONS:
            raise ConfigError(f"tail approximation {tail_approximation!r} is not one of "
                              f"{TAIL_APPROXIMATIONS}")
        if temperature == 1.0:
            return False
        return self.layout.logit_codec.check_temperature(temperature, tail_approximation, self.root)

    @property
    def packed(self) -> bool:
        """True when the cache keeps documents apart (``target_mask`` and ``document_ids``)."""
        return self.layout.token_codec.packed

    def read(self, index: int, *, layers=None, kd_top_k: int | None = None,
             logits: bool = True, temperature: float = 1.0,
             tail_approximation: str | None = None) -> dict:
        """One sequence: ``input_ids (L,)`` (and for a packed cache ``target_mask (L,)`` bool and
        ``document_ids (L,)`` int32), the teacher's logit targets and ``hidden`` =
        {layer: (L, D) stored dtype; int8 comes back dequantized to float32}.

        Logit targets: ``teacher_ids/teacher_logp (L, k)`` and ``teacher_log_tail (L,)`` for top-k
        and sampled caches (sampled: the empirical distribution of the draws, see
        :func:`counts_to_buckets`, and ``teacher_kl_offset (L,)`` when its draws' teacher
        log-prob is stored); ``teacher_final_hidden (L, D)`` for exact caches, to go
        through :meth:`head`. ``teacher_log_tail`` is the tail statistic at ``temperature``:
        ``log Σ_tail p^(1/T)`` (the log tail mass at T = 1), exact where the cache stores it,
        else from ``tail_approximation`` (see :meth:`check_temperature`). The log-probs stay
        at T = 1; the loss divides them by T. What is fetched and how it is decoded is the
        layout's codecs' (:mod:`unidistill.storage.codecs`).
        """
        return self.read_many([index], layers=layers, kd_top_k=kd_top_k, logits=logits,
                              temperature=temperature, tail_approximation=tail_approximation)[0]

    def read_many(self, indices, *, layers=None, kd_top_k: int | None = None,
                  logits: bool = True, temperature: float = 1.0,
                  tail_approximation: str | None = None) -> list[dict]:
        """Several sequences, as :meth:`read` gives each, fetched in one concurrent gather: every
        array of every sequence goes out together on Zarr's event loop (a batch of a DataLoader
        is one round of requests, not one per sequence)."""
        layers = list(self.layout.layers if layers is None else layers)
        self.check_request(layers, kd_top_k, temperature if logits else 1.0, tail_approximation)
        indices = [int(i) for i in indices]
        for index in indices:
            if not 0 <= index < self.layout.n_sequences:
                raise IndexError(f"sequence {index} out of range 0..{self.layout.n_sequences - 1}")
        codec, hidden, tokens = self.layout.logit_codec, self.layout.hidden_codec, self.layout.token_codec
        names = tokens.read_names()
        extra = codec.hidden_layers(self.final_layer) if logits else []
        if logits:
            names += codec.read_names(temperature)
        for j in dict.fromkeys(layers + extra):
            names += hidden.names(j)
        out = []
        for got in self.fetch_many(names, indices):
            seq = tokens.decode(got)
            if logits:
                seq.update(codec.decode(got, kd_top_k=kd_top_k, temperature=temperature,
                                        hidden={j: hidden.decode(j, got) for j in extra}))
            seq["hidden"] = {j: hidden.decode(j, got) for j in layers}
            out.append(seq)
        return out

    def fetch(self, names, index) -> dict[str, np.ndarray]:
        """``{name: array[index]}`` for several arrays of one sequence, read concurrently."""
        return self.fetch_many(names, [index])[0]

    def fetch_many(self, names, indices) -> list[dict[str, np.ndarray]]:
        """``[{name: array[index]} for index in indices]``, every read concurrent: one sequence
        spans 3-12 arrays, and on an object store each read is a round trip, so they all go out
        together on Zarr's event loop rather than one after another. With ``prefetch``, through
        the read-ahead (:mod:`~unidistill.storage.prefetch`)."""
        self.group  # noqa: B018  (opens the store and the prefetcher of this process)
        if self._prefetcher is not None:
            return self._prefetcher.fetch_many(list(names), [int(i) for i in indices])
        return self.fetch_now(names, indices)

    def fetch_now(self, names, indices) -> list[dict[str, np.ndarray]]:
        """:meth:`fetch_many` without the read-ahead: one concurrent gather, waited for."""
        arrays = self._arrays()

        async def one(name, index):
            return await _async_array(arrays[name]).getitem(index)

        async def together():
            return await asyncio.gather(*(one(n, i) for i in indices for n in names))

        flat = iter(zarr_sync(together()))
        return [{n: next(flat) for n in names} for _ in indices]

    def read_unit(self, names, unit: int):
        """A coroutine for Zarr's loop giving {name: array[unit's sequences]}, every array at
        once (a whole shard each). The arrays are opened here, in the caller's thread."""
        arrays, (start, stop) = self._arrays(), self.layout.unit_range(unit)

        async def read() -> dict[str, np.ndarray]:
            got = await asyncio.gather(*(_async_array(arrays[n]).getitem(slice(start, stop))
                                         for n in names))
            return dict(zip(names, got))

        return read()

    def unit_keys(self, names, unit: int) -> list[str]:
        """The store keys of ``unit``'s shard file of each array in ``names``: every array is
        sharded by ``shard_size`` sequences and whole along its other axes, so the unit's shard
        sits at shard-grid position (unit, 0, ...), named by the array's chunk key encoding."""
        arrays, keys = self._arrays(), []
        for name in names:
            array = arrays[name]
            coords = (unit,) + (0,) * (array.ndim - 1)
            keys.append(f"{array.path}/{array.metadata.encode_chunk_key(coords)}")
        return keys

    def _arrays(self) -> dict[str, zarr.Array]:
        # opened once per process (each open reads the array's metadata: a request remotely)
        group = self.group  # reopened, and the arrays dropped, in a new process
        if self._opened is None:
            self._opened = {name: group[name] for name in self.layout.array_specs()}
        return self._opened

    def read_array_unit(self, name: str, unit: int) -> np.ndarray:
        start, stop = self.layout.unit_range(unit)
        return self.group[name][start:stop]
