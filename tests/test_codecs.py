"""The representation codecs of storage.codecs: each one's arrays against the layout, encode then
decode against reference math, its cache-info line and its checks; and that a new
representation is one class."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from unidistill.cache_builder.build import build_cache
from unidistill.cache_builder.capture import TeacherRunner
from unidistill.cache_builder.config import BuildConfig
from unidistill.errors import CacheMismatchError, ConfigError
from unidistill.storage import CacheReader, decode_hidden
from unidistill.storage.codecs import HIDDEN_CODECS, LOGIT_CODECS, LogitCodec, hidden_codec, logit_codec
from unidistill.storage.codecs.hidden import BLOCK, OUTLIERS
from unidistill.storage.codecs.sampled import Sampled
from unidistill.storage.codecs.topk import TopK
from unidistill.storage.layout import (
    HEAD_FILE, INPUT_IDS, LOGIT_COUNTS, LOGIT_INDICES, LOGIT_RANGE, LOGIT_SAMPLE_LOGP, LOGIT_TAIL,
    CacheLayout, hidden_key, hidden_outlier_pos_key, hidden_outliers_key, hidden_scale_key,
    index_dtype_for,
)
from unidistill.storage.verify import verify_cache

from .conftest import make_llama

V, D, N_LAYERS = 80, 32, 2  # the tiny teacher: vocabulary, width, blocks (layer 2 = final state)
B, L = 2, 24  # one batch


def layout_for(mode: str, dtype: str = "float16", k: int = 8, **kw) -> CacheLayout:
    codec = LOGIT_CODECS[mode]
    args = dict(n_sequences=B, seq_len=L, stored_k=codec.stored_k_for(top_k=k, samples=k),
                vocab_size=V, hidden_size=D, layers=(1, N_LAYERS), hidden_dtype=dtype, shard_size=2,
                logits_mode=mode, tail_temperatures=(2.0,) if codec.has_top_k else (),
                sample_logp=codec.draws)
    return CacheLayout(**{**args, **kw})


@pytest.fixture(scope="module")
def teacher():
    return make_llama(V, hidden=D, layers=N_LAYERS)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(0)).numpy()


def encode(teacher, layout: CacheLayout, ids) -> tuple[dict, torch.Tensor]:
    """The runner's arrays for one batch, and the teacher's reference log-probs (B, L, V) fp32."""
    runner = TeacherRunner(teacher, layout.layers, layout.stored_k,
                           index_dtype=index_dtype_for(layout.vocab_size), hidden_dtype=layout.hidden_dtype,
                           mode=layout.logits_mode, tail_temperatures=layout.tail_temperatures)
    try:
        out = runner(ids, seed=3)
        final, _ = runner.forward(torch.from_numpy(ids.astype(np.int64)))
        with torch.no_grad():
            logp = torch.log_softmax(runner.logits(final.reshape(-1, D)), -1).reshape(B, L, V)
    finally:
        runner.close()
    return out, logp


def one_sequence(out: dict, i: int = 0) -> dict:
    return {name: a[i] for name, a in out.items()}


def decode(layout: CacheLayout, got: dict, **kw) -> dict:
    codec, hidden = layout.logit_codec, layout.hidden_codec
    extra = {j: hidden.decode(j, got) for j in codec.hidden_layers(N_LAYERS)}
    return codec.decode(got, kd_top_k=kw.get("kd_top_k"), temperature=kw.get("temperature", 1.0),
                        hidden=extra)


# -- arrays: every codec declares what the layout holds, and encodes and reads exactly that ---------
@pytest.mark.parametrize("dtype", sorted(HIDDEN_CODECS))
@pytest.mark.parametrize("mode", sorted(LOGIT_CODECS))
def test_every_codec_encodes_and_reads_the_arrays_the_layout_declares(teacher, ids, mode, dtype):
    layout = layout_for(mode, dtype)
    specs = layout.array_specs()
    grid, codec, hidden = layout.grid, layout.logit_codec, layout.hidden_codec
    assert type(codec) is LOGIT_CODECS[mode] and type(hidden) is HIDDEN_CODECS[dtype]
    declared = [INPUT_IDS, *codec.array_specs(grid),
                *(n for j in layout.layers for n in hidden.array_specs(j, grid, D))]
    assert list(specs) == declared                     # the layout is the codecs' arrays, in order
    out, _ = encode(teacher, layout, ids)
    assert sorted(out) == sorted(specs)                # what the writer will accept
    for name, a in out.items():
        assert a.dtype == specs[name]["dtype"], name
        assert a.shape == (B, *specs[name]["shape"][1:]), name
        assert specs[name]["chunks"] == (1, *specs[name]["shape"][1:])
        assert specs[name]["shards"] == (2, *specs[name]["shape"][1:])
    read = {INPUT_IDS, *(n for j in layout.layers for n in hidden.names(j))}
    for t in (1.0, *layout.tail_temperatures):
        read |= set(codec.read_names(t))
    assert read == set(specs)                          # nothing declared goes unread, nothing else is read


@pytest.mark.parametrize("mode", sorted(LOGIT_CODECS))
def test_the_logit_arrays_are_the_codecs_own(mode):
    layout = layout_for(mode)
    names = set(layout.logit_codec.array_specs(layout.grid))
    assert names == {n for n in layout.array_specs() if n.startswith("logits/")}
    if mode == "exact":
        assert names == set() and layout.logit_codec.read_names(2.0) == []


# -- encode then decode against reference math ------------------------------------------------------
def test_topk_gives_the_teachers_top_k_and_its_tails(teacher, ids):
    layout = layout_for("topk", k=8)
    out, logp = encode(teacher, layout, ids)
    got = one_sequence(out)
    ref = logp[0]                                                           # (L, V)
    full = decode(layout, got)
    tid = torch.from_numpy(full["teacher_ids"].astype(np.int64))
    assert tid.shape == (L, 8) and full["teacher_logp"].dtype == np.float16
    torch.testing.assert_close(tid, ref.topk(8).indices)
    torch.testing.assert_close(torch.from_numpy(full["teacher_logp"]).float(), ref.topk(8).values,
                               atol=4e-3, rtol=0)
    tail = ref.scatter(-1, tid, -math.inf).logsumexp(-1)
    torch.testing.assert_close(torch.from_numpy(full["teacher_log_tail"]), tail, atol=4e-3, rtol=1e-3)
    # k = 3 at T = 2: the tail is log Σ_{ids past the 3 kept} p^(1/2), the 5 dropped folded in
    cut = decode(layout, got, kd_top_k=3, temperature=2.0)
    assert np.array_equal(cut["teacher_ids"], full["teacher_ids"][:, :3])
    tempered = (ref / 2).scatter(-1, tid[:, :3], -math.inf).logsumexp(-1)
    torch.testing.assert_close(torch.from_numpy(cut["teacher_log_tail"]), tempered, atol=4e-3, rtol=1e-3)


def test_topk_q8_keeps_each_log_prob_within_half_a_step(teacher, ids):
    layout = layout_for("topk-q8", k=16)
    out, logp = encode(teacher, layout, ids)
    stored_ids = np.cumsum(out[LOGIT_INDICES].astype(np.int64), -1)          # delta-coded, ascending
    assert (np.diff(stored_ids, axis=-1) > 0).all()
    for i in range(B):
        got = decode(layout, one_sequence(out, i))
        tid = torch.from_numpy(got["teacher_ids"].astype(np.int64))
        assert torch.equal(tid.sort(-1).values, logp[i].topk(16).indices.sort(-1).values)
        step = out[LOGIT_RANGE][i, :, 1:].astype(np.float32)                   # (L, 1)
        err = (torch.from_numpy(got["teacher_logp"]) - logp[i].gather(-1, tid)).abs().numpy()
        assert (err <= step / 2 + 2e-3).all(), err.max()                     # + the fp16 of the maximum
        assert (np.diff(got["teacher_logp"], axis=-1) <= 0).all()           # sorted by probability
        torch.testing.assert_close(torch.from_numpy(got["teacher_log_tail"]),
                                   logp[i].scatter(-1, tid, -math.inf).logsumexp(-1), atol=4e-3, rtol=1e-3)


def test_sampled_counts_sum_to_the_draws_and_estimate_the_teachers_kl(teacher, ids):
    layout = layout_for("sampled", k=32)
    out, logp = encode(teacher, layout, ids)
    counts = out[LOGIT_COUNTS].astype(np.int64)
    assert (counts.sum(-1) == 32).all()
    for i in range(B):
        got = decode(layout, one_sequence(out, i))
        used = counts[i] > 0
        sid = torch.from_numpy(got["teacher_ids"].astype(np.int64))
        assert all((np.diff(row[u]) > 0).all() for row, u in zip(got["teacher_ids"], used))
        assert (got["teacher_ids"][~used] == 0).all()
        np.testing.assert_allclose(np.exp(got["teacher_logp"]).sum(-1), 1.0, rtol=1e-5)
        assert np.isneginf(got["teacher_log_tail"]).all()
        w = counts[i] / 32
        mean_logp = (w * logp[i].gather(-1, sid).numpy()).sum(-1)          # Σ (c/S) log p
        np.testing.assert_allclose(out[LOGIT_SAMPLE_LOGP][i], mean_logp, atol=1e-4)
        neg_entropy = (w * np.log(np.where(used, w, 1.0))).sum(-1)
        np.testing.assert_allclose(got["teacher_kl_offset"], neg_entropy - mean_logp, atol=1e-4)


def test_exact_stores_no_logits_and_reads_the_final_state(teacher, ids):
    layout = layout_for("exact")
    out, logp = encode(teacher, layout, ids)
    assert not [n for n in out if n.startswith("logits/")] and layout.stored_k == 0
    got = decode(layout, one_sequence(out))
    assert set(got) == {"teacher_final_hidden"}
    final = got["teacher_final_hidden"]
    assert final.dtype == np.float16 and np.array_equal(final, out[hidden_key(N_LAYERS)][0])
    runner = TeacherRunner(teacher, [], None)                  # the teacher's logits from that state
    with torch.no_grad():
        rebuilt = torch.log_softmax(runner.logits(torch.from_numpy(final).float()), -1)
    runner.close()
    torch.testing.assert_close(rebuilt, logp[0], atol=2e-2, rtol=0)


def outlier_states(seed: int = 0) -> torch.Tensor:
    """(2, 130, 16): two 64-token blocks and a part, a massive first token, one outlier channel."""
    h = torch.randn(2, 130, 16, generator=torch.Generator().manual_seed(seed))
    h[:, 0] *= 100.0
    h[:, :, 3] *= 20.0
    return h


def test_float16_hidden_is_the_states_in_float16():
    h, codec = outlier_states(), hidden_codec("float16")
    got = codec.encode(5, h)
    assert list(got) == [hidden_key(5)]
    back = codec.to_torch(codec.decode(5, one_sequence(got, 1)))
    assert back.dtype == torch.float16 and torch.equal(back, h[1].half())


def test_bfloat16_hidden_is_bit_exact():
    h, codec = outlier_states(), hidden_codec("bfloat16")
    got = codec.encode(5, h)
    assert got[hidden_key(5)].dtype == np.uint16
    back = decode_hidden(codec.decode(5, one_sequence(got, 0)), "bfloat16")
    assert back.dtype == torch.bfloat16
    assert torch.equal(back.view(torch.int16), h[0].to(torch.bfloat16).view(torch.int16))


def test_int8_hidden_is_within_half_its_block_scale_and_keeps_outlier_tokens():
    h, codec = outlier_states(), hidden_codec("int8")
    got = codec.encode(5, h)
    assert got[hidden_key(5)].dtype == np.int8 and got[hidden_scale_key(5)].shape == (2, 3, 16)
    for i in range(2):
        seq = one_sequence(got, i)
        back = codec.decode(5, seq)
        assert back.dtype == np.float32 and back.shape == (130, 16)
        pos = seq[hidden_outlier_pos_key(5)]
        assert len(pos) == OUTLIERS and 0 in pos                          # the massive token
        np.testing.assert_array_equal(back[pos], h[i, pos].half().float().numpy())
        bound = np.repeat(seq[hidden_scale_key(5)].astype(np.float32), BLOCK, axis=0)[:130] * 0.5
        ordinary = np.setdiff1d(np.arange(130), pos)
        err = np.abs(back - h[i].numpy())[ordinary]
        assert (err <= bound[ordinary] * 1.01 + 1e-6).all(), (err / bound[ordinary]).max()
        np.testing.assert_array_equal(seq[hidden_outliers_key(5)], h[i, pos].half().numpy())


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_float16_storage_refuses_states_beyond_its_range(dtype):
    h = torch.full((1, 4, 8), 7e4)
    with pytest.raises(ConfigError, match=r"layer 3 reach \|x\| = 7e\+04.*--hidden-dtype bfloat16"):
        hidden_codec(dtype).encode(3, h)
    hidden_codec("bfloat16").encode(3, h)                               # bf16 holds it


# -- describe -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, kw, line", [
    ("topk", dict(k=64), "top-64 + tail, T = 1,2"),
    ("topk", dict(k=64, tail_temperatures=()), "top-64 + tail, T = 1"),
    ("topk-q8", dict(k=64, tail_temperatures=(0.5, 2.0)), "top-64 + tail, T = 1,0.5,2, 8-bit log-probs"),
    ("sampled", dict(k=64), "64 draws per position (ids + counts)"),
    ("exact", dict(), f"exact: final layer + {HEAD_FILE}"),
])
def test_each_codec_describes_itself_as_cache_info_does(mode, kw, line):
    assert logit_codec(layout_for(mode, **kw)).describe() == line


def test_hidden_codecs_describe_their_dtype():
    assert [hidden_codec(d).describe().split()[0] for d in ("float16", "bfloat16", "int8")] == \
        ["float16", "bfloat16", "int8"]


# -- checks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, kw, message", [
    ("exact", dict(stored_k=4), "exact-logits cache stores no top-k ids, so top_k must be 0; got 4"),
    ("topk", dict(stored_k=0), "must be between 1 and 65534; got 0"),
    ("sampled", dict(stored_k=70000), "must be between 1 and 65534; got 70000"),
    ("sampled", dict(tail_temperatures=(2.0,)), "tempered tails belong to top-k caches; a sampled cache"),
    ("exact", dict(tail_temperatures=(2.0,)), "tempered tails belong to top-k caches; a exact cache"),
    ("topk", dict(tail_temperatures=(1.0, 2.0)), r"must be > 0 and != 1 .*got \[1.0, 2.0\]"),
    ("topk-q8", dict(tail_temperatures=(-1.0,)), "must be > 0 and != 1"),
    ("topk", dict(sample_logp=True), "sample_logp belongs to sampled caches, not topk"),
    ("topk", dict(logits_mode="dense"), "logits mode 'dense' is not one of"),
    ("topk", dict(hidden_dtype="int4"), "hidden dtype 'int4' is not supported"),
    ("topk", dict(shard_size=0), "shard size must be >= 1"),
])
def test_a_layout_a_codec_cannot_hold_is_refused(mode, kw, message):
    with pytest.raises(ConfigError, match=message):
        layout_for(mode, **kw)


def test_each_codec_says_which_top_k_and_temperatures_a_request_may_ask():
    topk, sampled, exact = (layout_for(m, k=8).logit_codec for m in ("topk", "sampled", "exact"))
    topk.check_kd_top_k(8, "C")
    with pytest.raises(CacheMismatchError, match="stores k=8; use 1 <= top_k <= 8"):
        topk.check_kd_top_k(9, "C")
    for codec in (sampled, exact):
        with pytest.raises(CacheMismatchError, match="no top-k to cut"):
            codec.check_kd_top_k(4, "C")
    assert topk.check_temperature(2.0, None, "C") is False               # stored exactly
    assert topk.check_temperature(3.0, "uniform", "C") is True           # approximated
    with pytest.raises(CacheMismatchError, match=r"T in \[1.0, 2.0\] only.*--temperatures 1,2,3"):
        topk.check_temperature(3.0, None, "C")
    with pytest.raises(CacheMismatchError, match="sampled from the teacher at T = 1"):
        sampled.check_temperature(2.0, "uniform", "C")
    assert exact.check_temperature(0.5, None, "C") is False              # any T: the full logits


def test_the_sampled_and_exact_codecs_refuse_a_training_they_cannot_feed(caplog):
    sampled = layout_for("sampled").logit_codec
    manifest = {"settings": {"sampling": {"temperature": 1.0}}}
    sampled.check_training(manifest, "C", temperature=1.0, kl_direction="forward")
    with pytest.raises(ConfigError, match=r"sampled from the teacher at T = 1.*--temperature 2"):
        sampled.check_training(manifest, "C", temperature=2.0, kl_direction="forward")
    with pytest.raises(ConfigError, match="kl_direction 'reverse'"):
        sampled.check_training(manifest, "C", temperature=1.0, kl_direction="reverse")
    old = Sampled(8, V, sample_logp=False)
    with caplog.at_level(logging.WARNING):
        old.check_training(manifest, "C", temperature=1.0, kl_direction="forward")
    assert "before sampled caches stored the draws' teacher log-probs" in caplog.text
    exact = layout_for("exact").logit_codec
    exact.check_training({"settings": {"teacher": {"architecture": "LlamaForCausalLM"}}}, "C",
                         temperature=3.0, kl_direction="reverse")
    with pytest.raises(CacheMismatchError, match="before unidistill recorded"):
        exact.check_training({"settings": {"teacher": {"architecture": "Gemma2ForCausalLM"}}}, "C",
                             temperature=1.0, kl_direction="forward")
    layout_for("topk").logit_codec.check_training({}, "C", temperature=7.0, kl_direction="reverse")


def test_exact_logits_need_float16_hidden_states(tmp_path):
    for dtype in ("bfloat16", "int8"):
        with pytest.raises(ConfigError, match=f"--hidden-dtype {dtype} would round"):
            BuildConfig(teacher="t", data="d", out=str(tmp_path / "x"), logits="exact", hidden_dtype=dtype)


# -- a new representation is one class --------------------------------------------------------------
class Argmax(LogitCodec):
    """A toy representation for the test: the teacher's most likely id and nothing else."""

    mode = "argmax"
    summary = "the most likely id"
    temperatures_served = "serves no temperature"

    @classmethod
    def stored_k_for(cls, *, top_k, samples):
        return 1

    def array_specs(self, grid):
        return {LOGIT_INDICES: self._ids_spec(grid)}

    def encode(self, teacher, final, seed=0):
        return {LOGIT_INDICES: self._store_ids(teacher.top_k_tail(final)[0])}

    def read_names(self, temperature):
        return [LOGIT_INDICES]

    def decode(self, got, *, kd_top_k, temperature, hidden):
        return {"teacher_ids": got[LOGIT_INDICES]}

    def check_temperature(self, temperature, tail_approximation, where):
        raise CacheMismatchError(f"cache {where} holds the argmax only")

    def describe(self):
        return "argmax"


def test_a_new_representation_is_one_class_in_the_registry(monkeypatch, tmp_path, tiny_teacher_dir, text_file):
    from transformers import AutoModelForCausalLM

    monkeypatch.setitem(LOGIT_CODECS, "argmax", Argmax)
    out = tmp_path / "c"
    build_cache(BuildConfig(teacher=str(tiny_teacher_dir), data=str(text_file), out=str(out), seq_len=16,
                            max_sequences=4, batch_size=2, shard_size=2, device="cpu", layers="1",
                            logits="argmax"), progress=False, log=lambda m: None)
    reader = CacheReader(out)
    assert reader.layout.stored_k == 1 and isinstance(reader.layout.logit_codec, Argmax)
    assert LOGIT_TAIL not in reader.layout.array_specs()
    assert verify_cache(out).ok
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    for i in range(len(reader)):
        seq = reader.read(i)
        with torch.no_grad():
            logits = model(torch.from_numpy(seq["input_ids"].astype(np.int64))[None]).logits[0]
        assert np.array_equal(seq["teacher_ids"][:, 0], logits.argmax(-1).numpy())
        assert set(seq) == {"input_ids", "teacher_ids", "hidden"}
    with pytest.raises(CacheMismatchError, match="argmax only"):
        reader.read(0, temperature=2.0)
    with pytest.raises(ConfigError, match="--temperatures 1,2 is for topk and topk-q8 caches; a argmax "
                                          "cache serves no temperature"):
        BuildConfig(teacher="t", data="d", out=str(tmp_path / "x"), logits="argmax", temperatures="1,2")


def test_the_registry_codecs_are_the_ones_tested():
    """A codec added to the registry without its tests fails here until they are written."""
    assert sorted(LOGIT_CODECS) == ["exact", "sampled", "topk", "topk-q8"]
    assert sorted(HIDDEN_CODECS) == ["bfloat16", "float16", "int8"]
    assert TopK in LOGIT_CODECS.values()


def test_the_cli_offers_exactly_the_registered_representations():
    """cache-build lists the names itself (importing the codecs would load torch at every CLI
    start); they must stay the registries' names, and cache-info prints each codec's describe()."""
    from unidistill.cli import main
    from unidistill.storage.codecs.registry import HIDDEN_CODECS, LOGIT_CODECS

    params = {p.name: p for p in main.commands["cache-build"].params}
    assert list(params["logits"].type.choices) == list(LOGIT_CODECS)
    assert list(params["hidden_dtype"].type.choices) == ["auto", *HIDDEN_CODECS]
