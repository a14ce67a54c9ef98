"""Layer maps: hand-computed examples, invariants, provenance, explicit maps and every error."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from unidistill.errors import CacheMismatchError, ConfigError
from unidistill.models.layer_map import (
    LAYER_MAP_STRATEGIES, check_layers_in_cache, create_layer_map, parse_layer_map,
    provenance_from_config, teacher_layers_for_students,
)

# uniform: j = floor(i * n_t / n_s + 0.5), worked out by hand.
# 20 <- 24: j = round_half_up(1.2 i)
UNIFORM_20_FROM_24 = {1: 1, 2: 2, 3: 4, 4: 5, 5: 6, 6: 7, 7: 8, 8: 10, 9: 11, 10: 12,
                      11: 13, 12: 14, 13: 16, 14: 17, 15: 18, 16: 19, 17: 20, 18: 22, 19: 23,
                      20: 24}
# 28 <- 32: j = round_half_up(8 i / 7)
UNIFORM_28_FROM_32 = {1: 1, 2: 2, 3: 3, 4: 5, 5: 6, 6: 7, 7: 8, 8: 9, 9: 10, 10: 11,
                      11: 13, 12: 14, 13: 15, 14: 16, 15: 17, 16: 18, 17: 19, 18: 21, 19: 22,
                      20: 23, 21: 24, 22: 25, 23: 26, 24: 27, 25: 29, 26: 30, 27: 31, 28: 32}
# 24 <- 30: j = round_half_up(1.25 i); the ties 2.5, 7.5, 12.5, 17.5, 22.5 go up
# (Python's round would give 2, 8, 12, 18, 22).
UNIFORM_24_FROM_30 = {1: 1, 2: 3, 3: 4, 4: 5, 5: 6, 6: 8, 7: 9, 8: 10, 9: 11, 10: 13,
                      11: 14, 12: 15, 13: 16, 14: 18, 15: 19, 16: 20, 17: 21, 18: 23, 19: 24,
                      20: 25, 21: 26, 22: 28, 23: 29, 24: 30}

# last: j = i + (n_t - n_s)
LAST_20_FROM_24 = {1: 5, 2: 6, 3: 7, 4: 8, 5: 9, 6: 10, 7: 11, 8: 12, 9: 13, 10: 14,
                   11: 15, 12: 16, 13: 17, 14: 18, 15: 19, 16: 20, 17: 21, 18: 22, 19: 23,
                   20: 24}
LAST_28_FROM_32 = {1: 5, 2: 6, 3: 7, 4: 8, 5: 9, 6: 10, 7: 11, 8: 12, 9: 13, 10: 14,
                   11: 15, 12: 16, 13: 17, 14: 18, 15: 19, 16: 20, 17: 21, 18: 22, 19: 23,
                   20: 24, 21: 25, 22: 26, 23: 27, 24: 28, 25: 29, 26: 30, 27: 31, 28: 32}
LAST_24_FROM_30 = {1: 7, 2: 8, 3: 9, 4: 10, 5: 11, 6: 12, 7: 13, 8: 14, 9: 15, 10: 16,
                   11: 17, 12: 18, 13: 19, 14: 20, 15: 21, 16: 22, 17: 23, 18: 24, 19: 25,
                   20: 26, 21: 27, 22: 28, 23: 29, 24: 30}

# Teacher of 30 blocks, pruning dropped 0-based blocks [3, 7, 11, 19, 20, 21].
PROVENANCE_30 = [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, 15, 16, 17, 18,
                 22, 23, 24, 25, 26, 27, 28, 29]
ORIGINAL_24_FROM_30 = {1: 1, 2: 2, 3: 3, 4: 5, 5: 6, 6: 7, 7: 9, 8: 10, 9: 11, 10: 13,
                       11: 14, 12: 15, 13: 16, 14: 17, 15: 18, 16: 19, 17: 23, 18: 24, 19: 25,
                       20: 26, 21: 27, 22: 28, 23: 29, 24: 30}

EXAMPLES = [
    (20, 24, "uniform", UNIFORM_20_FROM_24), (28, 32, "uniform", UNIFORM_28_FROM_32),
    (24, 30, "uniform", UNIFORM_24_FROM_30), (20, 24, "last", LAST_20_FROM_24),
    (28, 32, "last", LAST_28_FROM_32), (24, 30, "last", LAST_24_FROM_30),
]


@pytest.mark.parametrize("n_s, n_t, strategy, expected", EXAMPLES)
def test_hand_computed_examples(n_s, n_t, strategy, expected):
    assert create_layer_map(n_s, n_t, strategy) == expected
    assert parse_layer_map(strategy, n_s, n_t) == expected


def test_uniform_is_the_default():
    assert create_layer_map(20, 24) == UNIFORM_20_FROM_24


def test_uniform_rounds_half_up_not_to_even():
    # 2 * 30 / 24 = 2.5 -> 3; Python's round(2.5) would give 2
    assert create_layer_map(24, 30)[2] == 3
    assert create_layer_map(2, 5) == {1: 3, 2: 5}  # 2.5 -> 3


SIZES = [(n_s, n_t) for n_t in range(1, 41) for n_s in range(1, n_t + 1)]


@pytest.mark.parametrize("strategy", ["uniform", "last"])
def test_maps_are_strictly_increasing_in_range_and_end_at_the_last_block(strategy):
    for n_s, n_t in SIZES:
        layer_map = create_layer_map(n_s, n_t, strategy)
        assert list(layer_map) == list(range(1, n_s + 1))
        targets = list(layer_map.values())
        assert all(b > a for a, b in zip(targets, targets[1:])), (n_s, n_t, targets)
        assert 1 <= targets[0] and targets[-1] == n_t, (n_s, n_t, targets)


def test_uniform_matches_float_formula():
    import math
    for n_s, n_t in SIZES:
        expected = {i: math.floor(i * n_t / n_s + 0.5) for i in range(1, n_s + 1)}
        assert create_layer_map(n_s, n_t, "uniform") == expected


@pytest.mark.parametrize("strategy", LAYER_MAP_STRATEGIES)
@pytest.mark.parametrize("n", [1, 2, 7, 24])
def test_equal_depths_give_identity_for_every_strategy(strategy, n):
    provenance = list(range(n)) if strategy == "original" else None
    identity = {i: i for i in range(1, n + 1)}
    assert create_layer_map(n, n, strategy, provenance=provenance) == identity


def test_original_from_provenance():
    dropped = [3, 7, 11, 19, 20, 21]
    assert [b for b in range(30) if b not in dropped] == PROVENANCE_30
    assert create_layer_map(24, 30, "original", provenance=PROVENANCE_30) == ORIGINAL_24_FROM_30
    assert parse_layer_map("original", 24, 30, provenance=PROVENANCE_30) == ORIGINAL_24_FROM_30


def test_provenance_from_config_attribute_and_dict():
    record = {"teacher_blocks": PROVENANCE_30, "teacher": "some/model"}
    assert provenance_from_config(SimpleNamespace(unidistill_provenance=record)) == PROVENANCE_30
    assert provenance_from_config({"unidistill_provenance": record}) == PROVENANCE_30
    assert provenance_from_config(SimpleNamespace(num_hidden_layers=3)) is None
    assert provenance_from_config({"num_hidden_layers": 3}) is None
    assert provenance_from_config({"unidistill_provenance": {"other": 1}}) is None


def test_provenance_from_hf_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(num_hidden_layers=24,
                                      unidistill_provenance={"teacher_blocks": PROVENANCE_30})
    assert provenance_from_config(config) == PROVENANCE_30
    reloaded = transformers.LlamaConfig.from_dict(config.to_dict())
    assert provenance_from_config(reloaded) == PROVENANCE_30
    assert provenance_from_config(transformers.LlamaConfig(num_hidden_layers=2)) is None


def test_provenance_from_config_rejects_a_non_dict_record():
    with pytest.raises(ConfigError, match=r"\[1, 2\]"):
        provenance_from_config({"unidistill_provenance": [1, 2]})


# --- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("n_s, n_t, bad", [(0, 4, "n_student is 0"), (-2, 4, "n_student is -2"),
                                           (2, 0, "n_teacher is 0"), (True, 4, "n_student is True"),
                                           (2.0, 4, "n_student is 2.0")])
def test_bad_depths(n_s, n_t, bad):
    with pytest.raises(ConfigError, match=bad):
        create_layer_map(n_s, n_t)


@pytest.mark.parametrize("strategy", LAYER_MAP_STRATEGIES)
def test_student_deeper_than_teacher(strategy):
    with pytest.raises(ConfigError, match=r"student has 5 blocks but the teacher only 4.*deeper"):
        create_layer_map(5, 4, strategy, provenance=[0, 1, 2, 3, 4])


def test_unknown_strategy_lists_the_valid_ones_and_explicit_json():
    with pytest.raises(ConfigError) as info:
        create_layer_map(2, 4, "unifrom")
    message = str(info.value)
    assert "'unifrom'" in message and "uniform, last, original" in message and "JSON" in message
    with pytest.raises(ConfigError, match="'unifrom'"):
        parse_layer_map("unifrom", 2, 4)


def test_original_without_provenance():
    with pytest.raises(ConfigError, match=r"no pruning provenance.*uniform.*last.*explicit"):
        create_layer_map(3, 6, "original")


def test_original_without_provenance_names_the_layer_map_flag():
    """The hint names the flag that takes a layer map (--layer-map), not the old --map."""
    with pytest.raises(ConfigError) as info:
        create_layer_map(3, 6, "original")
    message = str(info.value)
    assert "Use --layer-map uniform or --layer-map last" in message
    assert "--map " not in message


@pytest.mark.parametrize("provenance, fragment", [
    ([0, 1], r"has 2 entries \[0, 1\].*3 blocks"),
    ([0, 1, 2, 3], r"has 4 entries"),
    ([0, 2, 6], r"holds \[6\], outside .* 0\.\.5"),
    ([-1, 2, 3], r"holds \[-1\]"),
    ([0, 3, 3], r"\[0, 3, 3\] is not strictly increasing"),
    ([4, 2, 3], r"\[4, 2, 3\] is not strictly increasing"),
    ([0, "1", 2], r"\[0, '1', 2\].*list of 0-based"),
    ("0,1,2", r"'0,1,2'.*list of 0-based"),
])
def test_bad_provenance(provenance, fragment):
    with pytest.raises(ConfigError, match=fragment):
        create_layer_map(3, 6, "original", provenance=provenance)


# --- explicit maps --------------------------------------------------------------------------

def test_explicit_json_string_subset_sorted():
    layer_map = parse_layer_map('{"4": 8, "1": 3, "2": 6}', 4, 8)
    assert layer_map == {1: 3, 2: 6, 4: 8}
    assert list(layer_map) == [1, 2, 4]


def test_explicit_dict_with_int_or_str_keys_and_teacher_embedding():
    assert parse_layer_map({2: 0, "1": 5}, 2, 8) == {1: 5, 2: 0}


def test_explicit_map_may_be_deeper_than_teacher():
    assert parse_layer_map('{"1": 1, "2": 1, "3": 2}', 3, 2) == {1: 1, 2: 1, 3: 2}


def test_explicit_json_file(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"1": 2, "3": 12}))
    assert parse_layer_map(str(path), 3, 12) == {1: 2, 3: 12}


def test_explicit_json_missing_file(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match=r"nope\.json.*does not exist"):
        parse_layer_map(missing, 3, 12)


@pytest.mark.parametrize("spec, fragment", [
    ('{"0": 1}', r"student block 0, but the student has blocks 1\.\.4.*embedding output"),
    ('{"5": 1}', r"student block 5, but the student has blocks 1\.\.4"),
    ('{"1": 9}', r"teacher layer 9, but the teacher has layers 0\.\.8.*0 = embedding output"),
    ('{"1": -1}', r"teacher layer -1"),
    ('{"1": 2.0}', r"to 2\.0, but teacher blocks must be integers"),
    ('{"1": "2"}', r"to '2', but teacher blocks must be integers"),
    ('{"1": true}', r"to True, but teacher blocks must be integers"),
    ('{"a": 2}', r"student block 'a'.*must be integers"),
    ('{"1.5": 2}', r"student block '1\.5'"),
    ('{"1": 2, "01": 3}', r"student block 1 twice"),
    ("{}", r"is \{\}.*non-empty"),
    ('{"1": 2', r"not valid JSON"),
])
def test_bad_explicit_maps(spec, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_layer_map(spec, 4, 8)


def test_bad_explicit_file_content(tmp_path):
    path = tmp_path / "map.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"map\.json.*\[1, 2\].*JSON object"):
        parse_layer_map(str(path), 4, 8)


def test_parse_rejects_other_types():
    with pytest.raises(ConfigError, match=r"\[1, 2\] of type list"):
        parse_layer_map([1, 2], 4, 8)


# --- union helper and cache check -----------------------------------------------------------

def test_teacher_layers_for_students_union():
    union = teacher_layers_for_students(20, 24, ["uniform", "last"])
    assert union == sorted(set(UNIFORM_20_FROM_24.values()) | set(LAST_20_FROM_24.values()))
    assert union == [1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
                     21, 22, 23, 24]
    assert teacher_layers_for_students(2, 8, ["uniform"]) == [4, 8]
    assert teacher_layers_for_students(2, 8, ["last", "uniform"]) == [4, 7, 8]


@pytest.mark.parametrize("strategies", [[], "uniform"])
def test_teacher_layers_for_students_needs_a_list(strategies):
    with pytest.raises(ConfigError, match="non-empty list"):
        teacher_layers_for_students(2, 8, strategies)


def test_teacher_layers_for_students_unknown_strategy():
    with pytest.raises(ConfigError, match="'middle'"):
        teacher_layers_for_students(2, 8, ["uniform", "middle"])


def test_check_layers_in_cache_passes_when_all_cached():
    check_layers_in_cache({1: 4, 2: 8}, [0, 4, 8])


def test_check_layers_in_cache_lists_missing_and_cached():
    with pytest.raises(CacheMismatchError) as info:
        check_layers_in_cache({1: 3, 2: 6, 3: 8}, [8, 4])
    message = str(info.value)
    assert "needs teacher layers [3, 6]" in message
    assert "cache holds [4, 8]" in message
    assert "Rebuild the cache with --layers" in message and "--layers 3,4,6,8" in message
    assert "choose a map" in message


def test_check_layers_in_cache_without_hidden_states():
    with pytest.raises(CacheMismatchError, match=r"\[2\].*no hidden-state layers"):
        check_layers_in_cache({1: 2}, [])
