"""Importance measures, head/MLP/hidden pruning and block scores against reference math on tiny
Llama models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from unidistill.cli import main
from unidistill.errors import ConfigError
from unidistill.pruning.depth import _WithoutBlocks, blocks_to_keep, drop_one_scores, keep_blocks
from unidistill.pruning.importance import collect_stats, kept_rms_ratios, norm_modules
from unidistill.pruning.prune import prune_model
from unidistill.pruning.width import (
    choose_channels,
    massive_channels,
    norm_scale_factors,
    prune_heads,
    prune_hidden,
    prune_mlp,
)

from .conftest import make_llama


def calib(vocab=50, n=6, length=16, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (n, length)).astype(np.int32)


def logits(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64))).logits


def hooked(model, ids):
    """Per sequence, by hand: down_proj inputs, o_proj inputs and every norm's output."""
    seen = {"mlp": {}, "attn": {}, "norm": {}}
    hooks = []
    for i, block in enumerate(model.model.layers):
        hooks.append(block.mlp.down_proj.register_forward_pre_hook(
            lambda m, a, i=i: seen["mlp"].setdefault(i, []).append(a[0].detach().clone())))
        hooks.append(block.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, i=i: seen["attn"].setdefault(i, []).append(a[0].detach().clone())))
    for name, norm in norm_modules(model).items():
        hooks.append(norm.register_forward_hook(
            lambda m, a, o, name=name: seen["norm"].setdefault(name, []).append((a[0].clone(), o.clone()))))
    for row in ids:  # one sequence at a time
        logits(model, row[None])
    for h in hooks:
        h.remove()
    return seen


def test_importance_equals_a_hand_computation_from_hooked_activations():
    model = make_llama(50).eval()
    ids = calib()
    stats = collect_stats(model, ids, batch_size=4, progress=False)  # batches of 4 and 2
    seen = hooked(model, ids)
    for i in range(4):
        acts = torch.cat(seen["mlp"][i])                                   # (N, L, I)
        l2 = acts.abs().mean(1).square().sum(0).sqrt()                     # mean over seq, L2 over batch
        torch.testing.assert_close(stats.mlp_importance("minitron")[i], l2)
        torch.testing.assert_close(stats.mlp_importance("mean")[i], acts.abs().mean((0, 1)))
        heads = torch.cat(seen["attn"][i]).unflatten(-1, (4, 8)).norm(dim=-1)   # (N, L, H)
        torch.testing.assert_close(stats.head_importance("minitron")[i],
                                   heads.mean(1).square().sum(0).sqrt())
        torch.testing.assert_close(stats.head_importance("mean")[i], heads.mean((0, 1)))
    outs = torch.stack([torch.cat([o for _, o in v]) for v in seen["norm"].values()])   # (norms, N, L, D)
    torch.testing.assert_close(stats.channel_importance("minitron"),
                               outs.abs().mean(2).square().sum((0, 1)).sqrt())
    torch.testing.assert_close(stats.channel_importance("mean"), outs.abs().mean((1, 2)).sum(0))
    ins = torch.stack([torch.cat([x for x, _ in v]) for v in seen["norm"].values()])
    torch.testing.assert_close(stats.channel_max, ins.abs().amax((0, 1, 2)))
    with pytest.raises(ConfigError, match="aggregation 'max' is not one of minitron, mean"):
        stats.mlp_importance("max")


def test_pruning_nothing_reproduces_the_teacher_exactly():
    model = make_llama(50).eval()
    ids = calib()
    before = logits(model, ids)
    stats = collect_stats(model, ids, progress=False)
    prune_heads(model, stats, 1.0, range(4))
    prune_mlp(model, stats, 1.0, range(4))
    record = prune_hidden(model, stats, 1.0, calib_ids=ids, norm_scale="token")
    assert set(record["norm_scales"].values()) == {1.0}
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-6, atol=1e-6)


def test_pruned_heads_and_neurons_equal_the_teacher_with_them_zeroed():
    """Dropping query heads is the teacher with their o_proj columns zeroed; dropping GLU neurons is
    the teacher with their down_proj columns zeroed, exactly."""
    model = make_llama(50, heads=4, kv_heads=2).eval()
    ids = calib()
    stats = collect_stats(model, ids, progress=False)
    reference = copy.deepcopy(model)
    heads = prune_heads(model, stats, 0.5, range(4))
    neurons = prune_mlp(model, stats, 0.5, range(4))
    assert model.config.num_attention_heads == 2 and model.model.layers[0].self_attn.q_proj.weight.shape == (16, 32)
    with torch.no_grad():
        for i, block in enumerate(reference.model.layers):
            # one query head kept in each group of 2: the most important of the pair
            imp = stats.head_importance()[i].view(2, 2)
            assert heads[i] == [g * 2 + int(imp[g].argmax()) for g in range(2)]
            for h in set(range(4)) - set(heads[i]):
                block.self_attn.o_proj.weight[:, h * 8:(h + 1) * 8] = 0
            dropped = sorted(set(range(64)) - set(neurons[i]))
            block.mlp.down_proj.weight[:, dropped] = 0
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)


def test_a_massive_activation_channel_survives_even_when_it_ranks_low():
    model = make_llama(50).eval()
    c = 5
    with torch.no_grad():  # token 7 puts a huge value in channel 5 that every norm scales away
        model.model.embed_tokens.weight[7, c] = 3000.0
        for norm in norm_modules(model).values():
            norm.weight[c] = 1e-4
    ids = calib()
    ids[:, 0] = 7
    stats = collect_stats(model, ids, progress=False)
    assert massive_channels(stats) == [c]
    assert c not in choose_channels(stats, 16, keep_massive=False).tolist()  # ranks low by importance
    kept = choose_channels(stats, 16).tolist()
    assert c in kept and len(kept) == 16
    record = prune_hidden(model, stats, 0.5, calib_ids=ids)
    assert c in record["channels"]


def test_norm_rescaling_math():
    model = make_llama(50).eval()
    ids = calib(n=3, length=5)
    channels = torch.tensor([0, 3, 4, 9, 17, 20, 30, 31])
    seen = hooked(model, ids)
    ratios = kept_rms_ratios(model, ids, channels, progress=False)
    x = torch.cat([x for x, _ in seen["norm"]["layers.2.post_attention_layernorm"]]).double()  # (N, L, D)
    kept, total = x[..., channels].square().sum(-1), x.square().sum(-1)
    r = ratios["layers.2.post_attention_layernorm"]
    assert r["energy"] == pytest.approx(float((kept.sum() / total.sum() * 32 / 8).sqrt()), rel=1e-9)
    assert r["token"] == pytest.approx(float((kept / total * 32 / 8).sqrt().mean()), rel=1e-9)
    assert set(norm_scale_factors(model, channels, "none", None).values()) == {1.0}


def test_token_scale_gives_a_calibration_token_its_teacher_norm_output_back():
    """Calibrated on a single token, the first norm of the width-pruned model outputs exactly the
    teacher's values on the kept channels for that token; without the rescale it does not."""
    ids = np.array([[11]], dtype=np.int32)
    outputs = {}
    for scale in ("token", "none", "teacher"):
        model = make_llama(50).eval()
        for norm in norm_modules(model).values():
            norm.variance_epsilon = 0.0  # the eps inside the RMS is the one thing not rescaled
        stats = collect_stats(model, calib(), progress=False)
        channels = None
        if scale != "teacher":
            channels = prune_hidden(model, stats, 0.5, calib_ids=ids, norm_scale=scale)["channels"]
        seen = hooked(model, ids)
        outputs[scale] = (seen["norm"]["layers.0.input_layernorm"][0][1][0, 0], channels)
    kept = outputs["token"][1]
    torch.testing.assert_close(outputs["token"][0], outputs["teacher"][0][kept], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outputs["none"][0], outputs["teacher"][0][kept], rtol=1e-2, atol=0)


def test_drop_one_scores_equal_removing_the_block_by_hand():
    model = make_llama(50, layers=4).eval()
    ids = calib(n=3)
    scores = drop_one_scores(model, ids, batch_size=2, progress=False)
    p = torch.log_softmax(logits(model, ids), -1)
    for block in range(4):
        pruned = keep_blocks(copy.deepcopy(model), [i for i in range(4) if i != block])
        q = torch.log_softmax(logits(pruned, ids), -1)
        kl = (p.exp() * (p - q)).sum(-1).mean()
        nll = -q[:, :-1].gather(-1, torch.from_numpy(ids[:, 1:].astype(np.int64))[..., None]).mean()
        assert scores[block]["kl"] == pytest.approx(float(kl), rel=1e-4)
        assert scores[block]["nll"] == pytest.approx(float(nll), rel=1e-5)
    blocks_before = list(model.model.layers)
    with _WithoutBlocks(model, [1, 2]) as kept:
        assert kept == [0, 3] and len(model.model.layers) == 2
    assert list(model.model.layers) == blocks_before and model.config.num_hidden_layers == 4
    torch.testing.assert_close(torch.log_softmax(logits(model, ids), -1), p)


@pytest.mark.parametrize("method", ["importance", "kl", "ppl"])
@pytest.mark.parametrize("iterative", [False, True])
def test_every_block_measure_drops_a_block_made_an_identity_first(method, iterative):
    model = make_llama(50, layers=5).eval()
    with torch.no_grad():  # block 3 adds nothing to the residual stream
        model.model.layers[3].self_attn.o_proj.weight.zero_()
        model.model.layers[3].mlp.down_proj.weight.zero_()
    keep, record = blocks_to_keep(model, method, 2, iterative=iterative, calib_ids=calib(),
                                  score_ids=calib()[:2], progress=False)
    assert len(keep) == 3 and len(record["drop_order"]) == 2
    if method == "ppl":  # on a random model other blocks may even help; block 3 changes nothing
        ids = calib()[:2]
        lp = torch.log_softmax(logits(model, ids), -1)[:, :-1]
        nll = -lp.gather(-1, torch.from_numpy(ids[:, 1:].astype(np.int64))[..., None]).mean()
        assert record["block_scores"][0]["3"] == pytest.approx(float(nll), abs=1e-5)
    else:
        assert record["drop_order"][0] == 3 and 3 not in keep
    assert len(record["block_scores"]) == (2 if iterative else 1)
    if iterative:  # the second round scores the four blocks left
        first = record["drop_order"][0]
        assert sorted(record["block_scores"][1]) == sorted(str(b) for b in range(5) if b != first)


def test_the_default_depth_method_is_importance():
    model = make_llama(50, layers=5).eval()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    assert prune_model(model, drop_layers=1, calib_ids=calib(), progress=False)["dropped_blocks"] == [1]


def test_bad_options_are_refused_with_the_way_out():
    ids = calib()
    with pytest.raises(ConfigError, match="--depth-iterative re-scores blocks; it needs"):
        prune_model(make_llama(50), drop_layers=1, depth_method="last", depth_iterative=True, calib_ids=ids)
    with pytest.raises(ConfigError, match="depth-method 'random' is not one of importance, kl, ppl, last"):
        prune_model(make_llama(50), drop_layers=1, depth_method="random", calib_ids=ids)
    with pytest.raises(ConfigError, match=r"heads keep ratio is 0; it must be in \(0, 1\]"):
        prune_model(make_llama(50), heads_keep=0, calib_ids=ids)
    with pytest.raises(ConfigError, match="norm scale 'rms' is not one of none, energy, token"):
        prune_model(make_llama(50), hidden_keep=0.5, norm_scale="rms", calib_ids=ids)
    with pytest.raises(ConfigError, match="--score-sequences is 0; it must be at least 1"):
        prune_model(make_llama(50), drop_layers=1, depth_method="kl", calib_ids=ids, score_sequences=0)
    with pytest.raises(ConfigError, match="need calibration text"):
        prune_model(make_llama(50), drop_layers=1, depth_method="kl")
    model = make_llama(50).eval()
    stats = collect_stats(model, ids, progress=False)
    stats.channel_max[:10] = 1e6  # 10 "massive" channels, 8 kept
    with pytest.raises(ConfigError, match="10 residual channels carry massive activations but only 8"):
        prune_hidden(model, stats, 0.25, calib_ids=ids)


def test_cli_refuses_an_unknown_norm_scale(tmp_path):
    res = CliRunner().invoke(main, ["prune", "--model", "x", "--out", str(tmp_path / "s"),
                                    "--norm-scale", "rms"])
    assert res.exit_code == 2 and "'rms' is not one of 'energy', 'token', 'none'" in res.output
