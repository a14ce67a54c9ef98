"""Depth pruning keeps the chosen blocks and records where they came from."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from unidistill.errors import ConfigError
from unidistill.models.layer_map import create_layer_map, provenance_from_config
from unidistill.pruning.depth import keep_blocks, last_blocks_dropped

from .conftest import make_llama


def test_nothing_removed_gives_the_same_logits():
    model = make_llama(50).eval()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
        after = keep_blocks(model, [0, 1, 2, 3])(ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert provenance_from_config(model.config) == [0, 1, 2, 3]


def test_kept_blocks_equal_running_those_blocks_by_hand(tmp_path):
    model = make_llama(50).eval()
    blocks = list(model.model.layers)
    keep_blocks(model, [0, 2])
    assert model.config.num_hidden_layers == 2 and list(model.model.layers) == [blocks[0], blocks[2]]
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 50, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
        # generation uses the KV cache, indexed by the renumbered layer_idx
        loaded.generate(ids, max_new_tokens=3, do_sample=False)
    # provenance survives the save and drives the `original` layer map (hidden_states indices)
    config = AutoConfig.from_pretrained(tmp_path)
    assert create_layer_map(2, 4, "original", provenance=provenance_from_config(config)) == {1: 1, 2: 3}


def test_pruning_twice_composes_provenance():
    model = make_llama(50, layers=4)
    keep_blocks(model, [1, 2, 3])
    keep_blocks(model, [0, 2])
    assert provenance_from_config(model.config) == [1, 3]


def test_last_blocks_dropped_and_bad_requests():
    assert last_blocks_dropped(30, 6) == list(range(24))
    with pytest.raises(ConfigError, match="cannot drop 4 of 4 decoder blocks"):
        last_blocks_dropped(4, 4)
    with pytest.raises(ConfigError, match=r"blocks to keep \[2, 1\] must be a non-empty increasing"):
        keep_blocks(make_llama(50), [2, 1])
