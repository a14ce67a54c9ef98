"""int8 hidden states with per-group scales: accuracy with outlier channels, and caches that
read and train like fp16 ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unidistill.cache_builder.build import build_cache
from unidistill.cache_builder.config import BuildConfig
from unidistill.storage import CacheReader
from unidistill.storage.hidden_q8 import dequantize, quantize
from unidistill.storage.info import cache_info
from unidistill.storage.verify import verify_cache
from unidistill.trainer.run import distill_from_cache

from .conftest import args_for, train_losses


def rel_error(approx, exact) -> float:
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))


def test_channel_scales_survive_outlier_channels():
    torch.manual_seed(0)
    h = torch.randn(4, 64, 256)
    # two outlier channels, large on every token as in real decoders' residual streams
    h[..., 7] = 200.0 + 20.0 * h[..., 7]
    h[..., 100] = -150.0 + 15.0 * h[..., 100]
    q, scale = quantize(h)
    assert q.dtype == torch.int8 and scale.shape == (4, 256) and int(q.min()) >= -127
    back = dequantize(q.numpy(), scale.numpy())
    per_token = np.linalg.norm(back - h.numpy(), axis=-1) / np.linalg.norm(h.numpy(), axis=-1)
    assert per_token.max() < 0.01                                      # every token, not on average
    ordinary = [c for c in range(256) if c not in (7, 100)]
    assert rel_error(back[..., ordinary], h.numpy()[..., ordinary]) < 0.01
    # one scale per token instead: the outliers take the whole range, the rest is lost
    naive_scale = h.abs().amax(-1, keepdim=True) / 127
    naive = ((h / naive_scale).round() * naive_scale).numpy()
    assert rel_error(naive[..., ordinary], h.numpy()[..., ordinary]) > 0.2


def test_a_massive_activation_costs_only_its_own_channel():
    torch.manual_seed(0)
    h = torch.randn(2, 64, 128)
    h[:, 0, 5] = 3000.0                                                # e.g. a first-token sink
    back = dequantize(*(t.numpy() for t in quantize(h)))
    assert abs(back[0, 0, 5] - 3000.0) < 3000.0 / 127
    others = [c for c in range(128) if c != 5]
    assert rel_error(back[..., others], h.numpy()[..., others]) < 0.01


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
            assert rel_error(b[j], a[j].astype(np.float32)) < 0.01
    assert verify_cache(caches["int8"]).ok
    d, length = 32, 32                                                 # int8 per token + fp16 per channel and sequence
    assert cache_info(caches["int8"])["bytes_per_token"]["hidden_raw"] == 2 * (d + 2 * d / length)
    runs = [distill_from_cache(caches[dtype], str(student_dir), args_for(
        tmp_path / f"run-{dtype}", max_steps=2, save_strategy="no", hidden_loss="mse"))
        for dtype in ("float16", "int8")]
    for x, y in zip(*(train_losses(r) for r in runs)):
        assert y == pytest.approx(x, rel=0.01)
