"""Hidden-state projectors: shapes, identity mode, inits, save/load round trip, errors, grads."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from unidistill.errors import ConfigError
from unidistill.trainer.projectors import (
    PROJECTOR_INITS, HiddenProjectors, load_projectors, save_projectors,
)

LAYER_MAP = {1: 2, 2: 4, 3: 6}


def make(d_s=8, d_t=12, **kwargs) -> HiddenProjectors:
    torch.manual_seed(0)
    return HiddenProjectors(LAYER_MAP, d_s, d_t, **kwargs)


CHANNELS = [0, 2, 3, 5, 7, 8, 10, 11]                                  # 8 of 12 teacher channels


@pytest.mark.parametrize("init", PROJECTOR_INITS)
def test_shapes(init):
    projectors = make(init=init, channels=CHANNELS if init == "channels" else None)
    assert sorted(projectors.proj.keys()) == ["1", "2", "3"]
    h = torch.randn(2, 5, 8)                                             # (B, L, d_s)
    assert projectors(2, h).shape == (2, 5, 12)                          # (B, L, d_t)
    out = projectors.project_all({1: h, 3: h[:1]})
    assert list(out) == [1, 3]
    assert out[1].shape == (2, 5, 12) and out[3].shape == (1, 5, 12)
    for linear in projectors.proj.values():
        assert linear.weight.shape == (12, 8) and linear.bias is None


def test_identity_when_widths_equal_and_not_forced():
    projectors = HiddenProjectors(LAYER_MAP, 16, 16)
    assert not projectors.projects
    assert len(list(projectors.parameters())) == 0
    h = torch.randn(2, 3, 16)
    assert projectors(1, h) is h
    assert projectors.project_all({2: h})[2] is h


def test_forced_projection_with_equal_widths():
    projectors = HiddenProjectors(LAYER_MAP, 16, 16, force=True)
    assert projectors.projects
    assert sum(p.numel() for p in projectors.parameters()) == 3 * 16 * 16


@pytest.mark.parametrize("d_s, d_t", [(4, 6), (6, 4), (5, 5)])
def test_identity_init_copies_channels_exactly(d_s, d_t):
    projectors = HiddenProjectors({1: 1}, d_s, d_t, force=True, init="identity")
    h = torch.randn(3, 7, d_s)
    out = projectors(1, h)                                               # (3, 7, d_t)
    n = min(d_s, d_t)
    assert torch.equal(out[..., :n], h[..., :n])
    assert torch.equal(out[..., n:], torch.zeros(3, 7, d_t - n))


def test_xavier_keeps_the_norm_at_a_sensible_scale():
    projectors = HiddenProjectors({1: 1}, 256, 512, init="xavier")
    h = torch.randn(4, 64, 256)
    ratio = projectors(1, h).norm() / h.norm()
    assert 0.5 < ratio < 2.0


def test_orthogonal_preserves_norm_when_widening():
    projectors = HiddenProjectors({1: 1}, 8, 16, init="orthogonal")
    w = projectors.proj["1"].weight                                      # (16, 8)
    torch.testing.assert_close(w.T @ w, torch.eye(8), atol=1e-5, rtol=0)


def test_channels_init_puts_each_student_channel_back_where_it_was_cut_from():
    projectors = make(init="channels", channels=CHANNELS)
    h = torch.randn(2, 3, 8)
    out = projectors(1, h)                                               # (2, 3, 12)
    assert torch.equal(out[..., CHANNELS], h)
    dropped = [c for c in range(12) if c not in CHANNELS]
    assert torch.equal(out[..., dropped], torch.zeros(2, 3, 4))
    # a teacher state whose kept channels are the student's: cosine 1 from the first step
    teacher = torch.randn(2, 3, 12)
    teacher[..., dropped] = 0
    assert torch.allclose(projectors(2, teacher[..., CHANNELS]), teacher)


@pytest.mark.parametrize("channels, fragment", [
    (None, "needs the teacher channel"),
    ([0, 1, 2], "8 hidden channels.*got 3 entries"),
    ([0, 1, 2, 3, 4, 5, 6, 12], "distinct teacher channel in 0..11"),
    ([0, 0, 2, 3, 4, 5, 6, 7], "distinct"),
])
def test_channels_init_refuses_a_bad_channel_list(channels, fragment):
    with pytest.raises(ConfigError, match=fragment):
        make(init="channels", channels=channels)


def test_channels_survive_save_and_load(tmp_path):
    save_projectors(make(init="channels", channels=CHANNELS), tmp_path)
    loaded = load_projectors(tmp_path)
    assert loaded.init == "channels" and loaded.channels == CHANNELS
    assert json.loads((tmp_path / "projectors.json").read_text())["channels"] == CHANNELS


def test_unknown_init():
    with pytest.raises(ConfigError, match=r"'kaiming'.*xavier, identity, orthogonal, channels"):
        HiddenProjectors(LAYER_MAP, 8, 12, init="kaiming")


@pytest.mark.parametrize("kwargs, fragment", [
    ({"d_student": 0}, "d_student is 0"),
    ({"d_teacher": 2.5}, "d_teacher is 2.5"),
    ({"layer_map": {"1": 2}}, r"non-integer entries \{'1': 2\}"),
    ({"layer_map": [1, 2]}, r"layer_map is \[1, 2\]"),
])
def test_bad_constructor_arguments(kwargs, fragment):
    args = {"layer_map": LAYER_MAP, "d_student": 8, "d_teacher": 12, **kwargs}
    with pytest.raises(ConfigError, match=fragment):
        HiddenProjectors(args["layer_map"], args["d_student"], args["d_teacher"])


def test_forward_errors():
    projectors = make()
    with pytest.raises(ConfigError, match=r"student layer 7 has no projector.*\[1, 2, 3\]"):
        projectors(7, torch.randn(1, 2, 8))
    with pytest.raises(ConfigError, match=r"\(1, 2, 10\).*d_student=8"):
        projectors(1, torch.randn(1, 2, 10))


def test_casts_low_precision_input_to_weight_dtype():
    projectors = make()
    h = torch.randn(1, 2, 8).to(torch.bfloat16)
    assert projectors(1, h).dtype == torch.float32


def test_config_dict():
    assert make(force=True, init="orthogonal").config_dict() == {
        "layer_map": {"1": 2, "2": 4, "3": 6}, "d_student": 8, "d_teacher": 12, "force": True,
        "init": "orthogonal", "format_version": 1}


@pytest.mark.parametrize("d_s, d_t, force", [(8, 12, False), (12, 12, True), (12, 12, False)])
def test_save_load_round_trip(tmp_path, d_s, d_t, force):
    projectors = make(d_s, d_t, force=force)
    with torch.no_grad():                       # move away from the init so loading matters
        for p in projectors.parameters():
            p.add_(torch.randn_like(p))
    save_projectors(projectors, tmp_path / "proj")
    assert sorted(p.name for p in (tmp_path / "proj").iterdir()) == [
        "projectors.json", "projectors.safetensors"]
    assert json.loads((tmp_path / "proj" / "projectors.json").read_text()) == \
        projectors.config_dict()

    loaded = load_projectors(tmp_path / "proj")
    assert loaded.config_dict() == projectors.config_dict()
    h = torch.randn(2, 3, d_s)
    for layer in LAYER_MAP:
        assert torch.equal(loaded(layer, h), projectors(layer, h))
    assert loaded.state_dict().keys() == projectors.state_dict().keys()


def test_round_trip_keeps_saved_dtype(tmp_path):
    projectors = make().to(torch.bfloat16)
    save_projectors(projectors, tmp_path)
    loaded = load_projectors(tmp_path)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert all(p.requires_grad for p in loaded.parameters())
    h = torch.randn(1, 2, 8)
    assert torch.equal(loaded(1, h), projectors(1, h))


def test_save_leaves_no_temporary_files_and_overwrites(tmp_path):
    save_projectors(make(), tmp_path)
    second = make(init="identity")
    save_projectors(second, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["projectors.json",
                                                          "projectors.safetensors"]
    assert load_projectors(tmp_path).config_dict()["init"] == "identity"


@pytest.mark.parametrize("remove", ["projectors.json", "projectors.safetensors"])
def test_load_missing_file(tmp_path, remove):
    save_projectors(make(), tmp_path)
    (tmp_path / remove).unlink()
    with pytest.raises(ConfigError, match=rf"\['{remove}'\] missing"):
        load_projectors(tmp_path)


def test_load_missing_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"no saved projectors in .*nowhere"):
        load_projectors(tmp_path / "nowhere")


def test_load_mismatched_shapes(tmp_path):
    save_projectors(make(8, 12), tmp_path)
    config = json.loads((tmp_path / "projectors.json").read_text())
    config["d_student"] = 10
    (tmp_path / "projectors.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"wrong shapes.*\(12, 8\), \(12, 10\)"):
        load_projectors(tmp_path)


def test_load_mismatched_layers(tmp_path):
    save_projectors(make(8, 12), tmp_path)
    config = json.loads((tmp_path / "projectors.json").read_text())
    config["layer_map"] = {"1": 2, "2": 4, "5": 6}
    (tmp_path / "projectors.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"missing tensors \['proj\.5\.weight'\], unexpected "
                                          r"tensors \['proj\.3\.weight'\]"):
        load_projectors(tmp_path)


def test_load_empty_weights_file_is_a_mismatch(tmp_path):
    save_projectors(make(8, 12), tmp_path)
    safetensors.torch.save_file({}, str(tmp_path / "projectors.safetensors"))
    with pytest.raises(ConfigError, match="missing tensors"):
        load_projectors(tmp_path)


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: c.update(format_version=2), "format_version 2"),
    (lambda c: c.pop("d_teacher"), r"lacks \['d_teacher'\]"),
    (lambda c: c.update(init="kaiming"), "'kaiming'"),
    (lambda c: c.update(layer_map={"one": 2}), r"layer_map keys \['one'\]"),
])
def test_load_bad_json(tmp_path, edit, fragment):
    save_projectors(make(), tmp_path)
    config = json.loads((tmp_path / "projectors.json").read_text())
    edit(config)
    (tmp_path / "projectors.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=fragment):
        load_projectors(tmp_path)


def test_load_unreadable_files(tmp_path):
    save_projectors(make(), tmp_path)
    (tmp_path / "projectors.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        load_projectors(tmp_path)
    (tmp_path / "projectors.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_projectors(tmp_path)


def test_gradients_flow_to_projector_weights():
    projectors = make()
    h = torch.randn(2, 3, 8, requires_grad=True)
    target = torch.randn(2, 3, 12)
    outputs = projectors.project_all({1: h, 3: h})                      # {layer: (2, 3, 12)}
    loss = sum(((out - target) ** 2).mean() for out in outputs.values())
    loss.backward()
    for key in ("1", "3"):
        grad = projectors.proj[key].weight.grad
        assert grad is not None and grad.abs().sum() > 0
    assert projectors.proj["2"].weight.grad is None                     # layer 2 not used
    assert h.grad is not None and h.grad.abs().sum() > 0
