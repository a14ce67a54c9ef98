"""unidistill prune on tiny random Llama models: shapes, provenance, exactness, importance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from transformers import AutoConfig, AutoModelForCausalLM

from unidistill.cli import main
from unidistill.errors import ConfigError
from unidistill.models.layer_map import create_layer_map, provenance_from_config
from unidistill.pruning.importance import collect_stats
from unidistill.pruning.prune import prune_model
from unidistill.pruning.width import kept_size, prune_hidden, prune_mlp

from .conftest import make_llama


def calib(vocab=50, n=6, length=16, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (n, length)).astype(np.int32)


def logits(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64))).logits


def test_shapes_provenance_and_reload(tmp_path):
    model = make_llama(50, hidden=32, layers=4, intermediate=64).eval()
    summary = prune_model(model, drop_layers=1, depth_method="last", mlp_keep=0.5, hidden_keep=0.75,
                          calib_ids=calib(), progress=False)
    assert (summary["num_hidden_layers"], summary["intermediate_size"], summary["hidden_size"]) == (3, 32, 24)
    assert summary["dropped_blocks"] == [3]
    assert summary["parameters_after"] < summary["parameters_before"]
    block = model.model.layers[0]
    assert block.self_attn.q_proj.weight.shape == (4 * 8, 24)   # heads x head_dim stay
    assert block.self_attn.o_proj.weight.shape == (24, 32)
    assert block.mlp.gate_proj.weight.shape == (32, 24) and block.mlp.down_proj.weight.shape == (24, 32)
    assert model.get_input_embeddings().weight.shape == (50, 24)
    assert model.model.norm.weight.shape == (24,)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = calib(seed=1)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids))
    config = AutoConfig.from_pretrained(tmp_path)
    assert provenance_from_config(config) == [0, 1, 2]
    assert len(config.unidistill_provenance["hidden_channels"]) == 24
    assert create_layer_map(3, 4, "original", provenance=provenance_from_config(config)) == {1: 1, 2: 2, 3: 3}


def test_kept_channels_are_the_most_important_and_norms_rescaled():
    model = make_llama(50).eval()
    stats = collect_stats(model, calib(), progress=False)
    norm_before = model.model.norm.weight.detach().clone()
    record = prune_hidden(model, stats, 0.5, calib_ids=calib(), norm_scale="energy")
    channels = record["channels"]
    top = set(torch.topk(stats.channel_importance(), 16).indices.tolist())
    assert set(channels) == top and channels == sorted(channels)
    # the teacher's own norm inputs: the energy factor equals the one from the teacher's stats
    ms = stats.norm_input_ms["norm"]
    factor = float((ms[channels].sum() / ms.sum() * 2) ** 0.5)
    assert record["norm_scales"]["norm"] == pytest.approx(factor, rel=1e-5)
    torch.testing.assert_close(model.model.norm.weight, norm_before[channels] * factor)


def test_mlp_keeps_the_most_active_neurons():
    model = make_llama(50).eval()
    stats = collect_stats(model, calib(), progress=False)
    up_before = model.model.layers[2].mlp.up_proj.weight.detach().clone()
    kept = prune_mlp(model, stats, 0.25, range(4))
    assert kept[2] == sorted(torch.topk(stats.mlp_importance()[2], 16).indices.tolist())
    torch.testing.assert_close(model.model.layers[2].mlp.up_proj.weight, up_before[kept[2]])


def test_importance_drops_a_block_made_an_identity():
    model = make_llama(50, layers=5).eval()
    with torch.no_grad():  # block 2 adds nothing to the residual stream: output == input
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    summary = prune_model(model, drop_layers=1, depth_method="importance", calib_ids=calib(),
                          progress=False)
    assert summary["dropped_blocks"] == [2]
    assert summary["block_cosine"][2] == pytest.approx(1.0, abs=1e-6)
    assert max(c for i, c in enumerate(summary["block_cosine"]) if i != 2) < 0.999
    assert provenance_from_config(model.config) == [0, 1, 3, 4]


def test_bad_requests_are_refused():
    with pytest.raises(ConfigError, match=r"MLP keep ratio is 1.5; it must be in \(0, 1\]"):
        kept_size(64, 1.5, "MLP")
    assert kept_size(576, 0.78, "hidden") == 448 and kept_size(1536, 0.67, "MLP") == 1024
    assert kept_size(576, 0.78, "hidden", multiple=72) == 432  # SmolLM2: 9 heads, lcm(9, 8) = 72
    with pytest.raises(ConfigError, match="need calibration text"):
        prune_model(make_llama(50), mlp_keep=0.5)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ConfigError, match="supports Llama-family decoders .* this model is 'gpt2'"):
        prune_model(gpt2, drop_layers=1)


def test_cli_prunes_a_folder_and_refuses_to_overwrite(tmp_path, tiny_teacher_dir, text_file):
    out = tmp_path / "student"
    argv = ["prune", "--model", str(tiny_teacher_dir), "--out", str(out), "--drop-layers", "1",
            "--depth-method", "importance", "--mlp-keep", "0.5", "--hidden-keep", "0.5",
            "--calib-data", str(text_file), "--calib-sequences", "4", "--seq-len", "16",
            "--device", "cpu"]
    res = CliRunner().invoke(main, argv)
    assert res.exit_code == 0, res.output
    assert "pruned: 3 blocks, hidden 16, MLP 32, 4 heads" in res.stdout
    config = json.loads((out / "config.json").read_text())
    assert len(config["unidistill_provenance"]["teacher_blocks"]) == 3
    assert (out / "tokenizer.json").is_file()
    AutoModelForCausalLM.from_pretrained(out)
    again = CliRunner().invoke(main, argv)
    assert again.exit_code == 2 and "is not empty" in again.output
    assert (out / "config.json").is_file()  # nothing already written was lost


def test_a_width_pruned_student_starts_its_projectors_at_the_kept_channels(tmp_path, tiny_teacher_dir,
                                                                          text_file, cache):
    """projector_init=auto reads hidden_channels from the pruned config; the hidden loss then starts
    far below what random (xavier) projectors give."""
    from unidistill.trainer.run import distill_from_cache

    from .conftest import args_for, train_losses

    student = tmp_path / "student"
    res = CliRunner().invoke(main, ["prune", "--model", str(tiny_teacher_dir), "--out", str(student),
                                    "--hidden-keep", "0.5", "--calib-data", str(text_file),
                                    "--calib-sequences", "4", "--seq-len", "16", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    kept = json.loads((student / "config.json").read_text())["unidistill_provenance"]["hidden_channels"]
    first_hidden_loss = {}
    for init in ("auto", "xavier"):
        trainer = distill_from_cache(cache, str(student), args_for(
            tmp_path / init, max_steps=1, learning_rate=1e-9, projector_init=init, save_strategy="no"))
        first_hidden_loss[init] = train_losses(trainer)[0][4]
    saved = json.loads((tmp_path / "auto" / "projectors.json").read_text())
    assert saved["init"] == "channels" and saved["channels"] == kept
    weight = safetensors.torch.load_file(tmp_path / "auto" / "projectors.safetensors")["proj.4.weight"]
    expected = torch.zeros(32, 16)
    expected[kept, range(16)] = 1.0
    torch.testing.assert_close(weight, expected, atol=1e-6, rtol=0)
    assert first_hidden_loss["auto"] < 0.5 * first_hidden_loss["xavier"], first_hidden_loss


def test_channels_init_needs_a_width_pruned_student(tmp_path, cache, student_dir):
    from unidistill.trainer.run import distill_from_cache

    from .conftest import args_for

    with pytest.raises(ConfigError, match="hidden_channels.*found none.*--projector-init xavier"):
        distill_from_cache(cache, str(student_dir), args_for(tmp_path, projector_init="channels"))
