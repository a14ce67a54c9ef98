"""int8 hidden states with per-group scales: accuracy with outlier channels, and caches that
read and train like fp16 ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unidistill.cache_builder.build import build_cache
from unidistill.cache_builder.config import BuildConfig
from unidistill.storage import CacheReader
from unidistill.storage.codecs.hidden import dequantize, quantize
from unidistill.storage.info import cache_info
from unidistill.storage.verify import verify_cache
from unidistill.trainer.run import distill_from_cache

from .conftest import args_for, train_losses


def rel_error(approx, exact) -> float:
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))


def per_token_error(approx, exact) -> np.ndarray:
    return np.linalg.norm(approx - exact, axis=-1) / np.linalg.norm(exact, axis=-1)


def round_trip(h: torch.Tensor) -> np.ndarray:
    return dequantize(*(t.numpy() for t in quantize(h)))


def test_channel_scales_survive_outlier_channels():
    torch.manual_seed(0)
    h = torch.randn(4, 200, 256)
    # two outlier channels, large on every token as in real decoders' residual streams
    h[..., 7] = 200.0 + 20.0 * h[..., 7]
    h[..., 100] = -150.0 + 15.0 * h[..., 100]
    q, scale, kept, pos = quantize(h)
    assert q.dtype == torch.int8 and int(q.min()) >= -127
    assert scale.shape == (4, 4, 256) and kept.shape == (4, 2, 256) and pos.shape == (4, 2)  # 200 = 3 x 64 + 8
    back = dequantize(q.numpy(), scale.numpy(), kept.numpy(), pos.numpy())
    assert per_token_error(back, h.numpy()).max() < 0.01              # every token, not on average
    ordinary = [c for c in range(256) if c not in (7, 100)]
    assert rel_error(back[..., ordinary], h.numpy()[..., ordinary]) < 0.01
    # one scale per token instead: the outliers take the whole range, the rest is lost
    naive_scale = h.abs().amax(-1, keepdim=True) / 127
    naive = ((h / naive_scale).round() * naive_scale).numpy()
    assert rel_error(naive[..., ordinary], h.numpy()[..., ordinary]) > 0.2


def test_massive_tokens_are_kept_apart_and_cost_the_others_nothing():
    torch.manual_seed(0)
    h = torch.randn(3, 128, 96)
    # attention-sink-like tokens: ~100x the others' norm in a few channels, at different places
    for b, t in ((0, 0), (1, 0), (1, 77), (2, 127)):
        h[b, t, :4] = 3000.0
    back = round_trip(h)
    err = per_token_error(back, h.numpy())
    assert err.mean() < 0.01 and err.max() < 0.02
    for b, t in ((0, 0), (1, 0), (1, 77), (2, 127)):                   # kept in fp16
        np.testing.assert_array_equal(back[b, t], h[b, t].half().float().numpy())
    # a scale per channel over the whole sequence, set by the massive token, rounds the ordinary
    # tokens of those channels away: what this layout avoids
    scale = h.abs().amax(-2, keepdim=True) / 127
    whole = ((h / scale).round() * scale).numpy()
    assert per_token_error(whole, h.numpy()).mean() > 0.1


def test_scale_blocks_follow_the_magnitude_along_the_sequence():
    torch.manual_seed(0)
    ramp = torch.logspace(-2, 1, 256)[None, :, None]                   # token norms spanning 1000x
    h = torch.randn(1, 256, 64) * ramp
    err = per_token_error(round_trip(h), h.numpy())
    assert err.mean() < 0.05 and np.median(err) < 0.02
    # the same states with one scale per channel for the sequence: the small tokens are lost
    scale = h.abs().amax(-2, keepdim=True) / 127
    whole = ((h / scale).round() * scale).numpy()
    assert per_token_error(whole, h.numpy()).mean() > 0.2


def test_an_int8_cache_reads_and_trains_like_fp16(tmp_path, tiny_teacher_dir, text_file, student_dir):
    caches = {}
    for dtype in ("float16", "int8"):
        caches[dtype] = tmp_path / dtype
        build_cache(BuildConfig(teacher=str(tiny_teacher_dir), data=str(text_file), out=str(caches[dtype]),
                                seq_len=32, top_k=16, layers="2,4", max_sequences=8, batch_size=4,
                                shard_size=4, device="cpu", hidden_dtype=dtype),
                    progress=False, log=lambda m: None)
    fp16, int8 = CacheReader(caches["float16"]), CacheReader(caches["int8"])
    for i in range(len(fp16)):
        a, b = fp16.read(i)["hidden"], int8.read(i)["hidden"]
        for j in (2, 4):
            assert b[j].dtype == np.float32
            assert per_token_error(b[j], a[j].astype(np.float32)).mean() < 0.01
    assert verify_cache(caches["int8"]).ok
    d, length = 32, 32     # int8 per token; per sequence: a block of fp16 scales, 2 fp16 tokens + positions
    assert cache_info(caches["int8"])["bytes_per_token"]["hidden_raw"] == 2 * (d + (2 * d + 2 * (2 * d + 4)) / length)
    runs = [distill_from_cache(caches[dtype], str(student_dir), args_for(
        tmp_path / f"run-{dtype}", max_steps=2, save_strategy="no", hidden_loss="mse"))
        for dtype in ("float16", "int8")]
    for x, y in zip(*(train_losses(r) for r in runs)):
        assert y == pytest.approx(x, rel=0.01)
