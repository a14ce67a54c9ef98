"""Layer indices: which teacher hidden state each student hidden state is distilled against.

Index convention
----------------
Every layer index here is a Hugging Face ``hidden_states`` index, as returned with
``output_hidden_states=True``:

* ``0`` is the embedding output (before any decoder block);
* ``i`` (1-based) is the output of decoder block ``i``;
* ``n`` is the last block. In Llama-family models ``hidden_states[n]`` is taken *after* the
  final norm, so it is not the raw residual stream like the others.

A layer map is a ``dict[int, int]`` from student blocks ``i`` in ``1..n_s`` to teacher blocks
``j`` in ``1..n_t`` (explicit maps may also target ``0``, the teacher's embedding output).
The teacher side is what phase one cached with ``--layers`` (checked by
:func:`check_layer_range`), and what the hooked teacher forward captures.

Strategies
----------
* ``uniform``: ``j = floor(i * n_t / n_s + 0.5)`` (round half up), spreading the student evenly
  over the teacher; the last student block maps to the last teacher block.
* ``last``: ``j = i + (n_t - n_s)``, aligning the student with the top of the teacher.
* ``original``: the teacher block each student block was copied from, as recorded by a pruning
  step in the student config (see :func:`provenance_from_config`).
* an explicit JSON object ``'{"1": 3, "2": 6}'`` or a path to a ``.json`` file holding one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Mapping

from unidistill.errors import CacheMismatchError, ConfigError

LAYER_MAP_STRATEGIES = ("uniform", "last", "original")
PROVENANCE_KEY = "unidistill_provenance"
PROVENANCE_BLOCKS_KEY = "teacher_blocks"

_EXPLICIT_HINT = ('or an explicit JSON map such as \'{"1": 3, "2": 6}\' (student block -> '
                  'teacher block), or a path to a .json file holding one')
_CONVENTION = ("indices are Hugging Face hidden_states indices: 0 = embedding output, "
               "i = output of decoder block i (1-based), n = last block")


def _is_int(value) -> bool:
    """True for a real int (bool is an int subclass but never a layer index)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive_depths(n_student, n_teacher) -> None:
    """Raise ConfigError unless both depths are ints >= 1."""
    for name, value in (("n_student", n_student), ("n_teacher", n_teacher)):
        if not _is_int(value) or value < 1:
            raise ConfigError(f"{name} is {value!r}, but it must be a whole number of decoder "
                              f"blocks >= 1; pass the num_hidden_layers of the model config")


def _check_depths(n_student, n_teacher) -> None:
    """Raise ConfigError unless both depths are ints >= 1 and the student is not deeper."""
    _check_positive_depths(n_student, n_teacher)
    if n_student > n_teacher:
        raise ConfigError(f"the student has {n_student} blocks but the teacher only {n_teacher}; "
                          f"the uniform, last and original strategies need a student no deeper "
                          f"than its teacher. Use a shallower student or an explicit JSON map "
                          f"(several student blocks may then share a teacher block)")


def check_layer_range(layers, n_layers: int) -> None:
    """Raise ConfigError for a teacher ``hidden_states`` index outside 0..n_layers."""
    bad = [j for j in layers if not 0 <= j <= n_layers]
    if bad:
        raise ConfigError(f"teacher layers {bad} are out of range: the teacher has {n_layers} "
                          f"blocks, so valid layers are 0..{n_layers} (0 = embeddings, "
                          f"{n_layers} = last block)")


def _uniform_map(n_student: int, n_teacher: int) -> dict[int, int]:
    """i -> floor(i * n_t / n_s + 0.5), in exact integer arithmetic (no float rounding ties)."""
    return {i: (2 * i * n_teacher + n_student) // (2 * n_student) for i in range(1, n_student + 1)}


def _last_map(n_student: int, n_teacher: int) -> dict[int, int]:
    """i -> i + (n_t - n_s): the student's blocks sit on the teacher's top blocks."""
    offset = n_teacher - n_student
    return {i: i + offset for i in range(1, n_student + 1)}


def _check_provenance(provenance, n_student: int, n_teacher: int) -> list[int]:
    """Validate a pruning provenance (0-based teacher block per student block); return a copy."""
    if provenance is None:
        raise ConfigError(f"layer map 'original' needs the teacher block each student block was "
                          f"copied from, but the student config has no pruning provenance "
                          f"({PROVENANCE_KEY}['{PROVENANCE_BLOCKS_KEY}']). Use --layer-map uniform "
                          f"or --layer-map last, {_EXPLICIT_HINT}")
    if not isinstance(provenance, (list, tuple)) or not all(_is_int(p) for p in provenance):
        raise ConfigError(f"pruning provenance is {provenance!r}, but it must be a list of "
                          f"0-based teacher block indices (ints), one per student block")
    if len(provenance) != n_student:
        raise ConfigError(f"pruning provenance has {len(provenance)} entries {list(provenance)}, "
                          f"but the student has {n_student} blocks and needs one entry per block; "
                          f"the provenance belongs to another model, re-run the pruning step")
    outside = [p for p in provenance if not 0 <= p < n_teacher]
    if outside:
        raise ConfigError(f"pruning provenance {list(provenance)} holds {outside}, outside the "
                          f"teacher's 0-based blocks 0..{n_teacher - 1}; the provenance belongs "
                          f"to another teacher, check --teacher or re-run the pruning step")
    if any(b <= a for a, b in zip(provenance, provenance[1:])):
        raise ConfigError(f"pruning provenance {list(provenance)} is not strictly increasing; a "
                          f"pruned student keeps teacher blocks in order without repeats, so the "
                          f"provenance is corrupt. Re-run the pruning step or use an explicit map")
    return list(provenance)


def create_layer_map(n_student: int, n_teacher: int, strategy: str = "uniform", *,
                     provenance: list[int] | None = None) -> dict[int, int]:
    """Map student blocks 1..n_student to teacher blocks 1..n_teacher with a named strategy.

    ``provenance`` (only for ``original``) lists, for student block i, the 0-based index of the
    teacher block it was copied from at ``provenance[i - 1]``; the map is then
    ``i -> provenance[i - 1] + 1`` (hidden_states indices are 1-based for blocks).
    """
    _check_depths(n_student, n_teacher)
    if strategy == "uniform":
        return _uniform_map(n_student, n_teacher)
    if strategy == "last":
        return _last_map(n_student, n_teacher)
    if strategy == "original":
        blocks = _check_provenance(provenance, n_student, n_teacher)
        return {i: block + 1 for i, block in enumerate(blocks, start=1)}
    raise ConfigError(f"unknown layer-map strategy {strategy!r}; expected one of "
                      f"{', '.join(LAYER_MAP_STRATEGIES)}, {_EXPLICIT_HINT}")


def _parse_index(value, what: str, source: str) -> int:
    """An int layer index from an int or a decimal string (JSON object keys are strings)."""
    if _is_int(value):
        return value
    if isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]+", value.strip()):
        return int(value.strip())
    raise ConfigError(f"layer map {source} has {what} {value!r}, but layer indices must be "
                      f"integers; {_CONVENTION}")


def _validate_explicit(raw: Mapping, n_student: int, n_teacher: int, source: str) -> dict[int, int]:
    """Int-keyed, range-checked, student-sorted copy of an explicit map."""
    _check_positive_depths(n_student, n_teacher)
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"layer map {source} is {raw!r}, but an explicit map must be a non-empty "
                          f'JSON object such as {{"1": 3, "2": 6}} '
                          f'(student block -> teacher block)')
    result: dict[int, int] = {}
    for key, value in raw.items():
        student = _parse_index(key, "student block", source)
        if not _is_int(value):
            raise ConfigError(f"layer map {source} maps student block {key!r} to {value!r}, but "
                              f"teacher blocks must be integers; {_CONVENTION}")
        if not 1 <= student <= n_student:
            raise ConfigError(f"layer map {source} names student block {student}, but the student "
                              f"has blocks 1..{n_student}; {_CONVENTION} (0, the embedding output, "
                              f"is not a student block)")
        if not 0 <= value <= n_teacher:
            raise ConfigError(f"layer map {source} maps student block {student} to teacher layer "
                              f"{value}, but the teacher has layers 0..{n_teacher}; {_CONVENTION}")
        if student in result:
            raise ConfigError(f"layer map {source} names student block {student} twice; give "
                              f"each student block at most one teacher block")
        result[student] = value
    return dict(sorted(result.items()))


def _load_json_map(text: str, source: str):
    """json.loads with a ConfigError that names where the text came from."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"layer map {source} is not valid JSON ({exc}); write it like "
                          f'\'{{"1": 3, "2": 6}}\' (student block -> teacher block)') from exc


def parse_layer_map(spec: str | dict, n_student: int, n_teacher: int, *,
                    provenance: list[int] | None = None) -> dict[int, int]:
    """Turn a ``--layer-map`` value into a layer map sorted by student block.

    ``spec`` is a strategy name (see :data:`LAYER_MAP_STRATEGIES`), an explicit JSON object
    string, a path to a ``.json`` file holding one, or an already parsed dict. Explicit maps may
    cover a subset of the student blocks; they are range-checked against the depths given.
    """
    if isinstance(spec, Mapping):
        return _validate_explicit(spec, n_student, n_teacher, "dict")
    if not isinstance(spec, str):
        raise ConfigError(f"layer map is {spec!r} of type {type(spec).__name__}; expected a "
                          f"strategy name ({', '.join(LAYER_MAP_STRATEGIES)}), {_EXPLICIT_HINT}")
    text = spec.strip()
    if text in LAYER_MAP_STRATEGIES:
        return create_layer_map(n_student, n_teacher, text, provenance=provenance)
    if text.startswith("{"):
        return _validate_explicit(_load_json_map(text, "JSON"), n_student, n_teacher, "JSON")
    path = Path(text)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise ConfigError(f"layer map file {str(path)!r} does not exist; pass an existing "
                              f".json file, a strategy ({', '.join(LAYER_MAP_STRATEGIES)}) or "
                              f"inline JSON")
        source = f"file {str(path)!r}"
        raw = _load_json_map(path.read_text(), source)
        return _validate_explicit(raw, n_student, n_teacher, source)
    return create_layer_map(n_student, n_teacher, text, provenance=provenance)


def provenance_record(config) -> Mapping:
    """The pruning record ``config.unidistill_provenance`` ({} when the model was not pruned).

    ``config`` is a Hugging Face config (attribute) or a plain dict (key), e.g. a loaded
    ``config.json``.
    """
    if isinstance(config, Mapping):
        record = config.get(PROVENANCE_KEY)
    else:
        record = getattr(config, PROVENANCE_KEY, None)
    if record is None:
        return {}
    if not isinstance(record, Mapping):
        raise ConfigError(f"the student config's {PROVENANCE_KEY} is {record!r}, but it must be a "
                          f"dict with a '{PROVENANCE_BLOCKS_KEY}' list; the config was edited "
                          f"by hand or by another tool, re-run the pruning step")
    return record


def provenance_from_config(config) -> list[int] | None:
    """The pruning provenance ``config.unidistill_provenance["teacher_blocks"]``, or None.

    The list is returned as stored; :func:`create_layer_map` validates it.
    """
    blocks = provenance_record(config).get(PROVENANCE_BLOCKS_KEY)
    return None if blocks is None else list(blocks)


def teacher_layers_for_students(n_student: int, n_teacher: int, strategies: list[str], *,
                                provenance: list[int] | None = None) -> list[int]:
    """Sorted union of the teacher layers the given strategies map a student of n_student to.

    Used by cache-build ``--student-layers N --layer-map uniform,last`` to cache exactly the teacher
    hidden states those students will need.
    """
    if isinstance(strategies, str) or not strategies:
        raise ConfigError(f"strategies is {strategies!r}; expected a non-empty list of strategy "
                          f"names such as ['uniform', 'last']")
    layers: set[int] = set()
    for spec in strategies:
        layers.update(parse_layer_map(spec, n_student, n_teacher, provenance=provenance).values())
    return sorted(layers)


def check_layers_in_cache(layer_map: Mapping[int, int], cached_layers: Iterable[int]) -> None:
    """Raise CacheMismatchError unless every teacher layer the map targets is in the cache."""
    cached = sorted(set(cached_layers))
    missing = sorted(set(layer_map.values()) - set(cached))
    if not missing:
        return
    needed = sorted(set(cached) | set(layer_map.values()))
    held = str(cached) if cached else "no hidden-state layers"
    raise CacheMismatchError(
        f"the layer map needs teacher layers {missing} that the cache does not hold; the cache "
        f"holds {held}. Rebuild the cache with --layers including them (e.g. --layers "
        f"{','.join(map(str, needed))}), or choose a map whose teacher layers are all cached")
