"""Phase one end to end on a tiny random Llama: the cache equals a direct teacher forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from unidistill.cache_builder.build import build_cache
from unidistill.cache_builder.config import BuildConfig
from unidistill.text.data import iter_documents, pack_documents
from unidistill.storage import CacheReader, decode_hidden

SEQ_LEN = 32


def build(teacher, data, out, **kw):
    cfg = BuildConfig(teacher=str(teacher), data=str(data), out=str(out), seq_len=SEQ_LEN,
                      device="cpu", **{"top_k": 8, "layers": "0,2,4", "max_sequences": 10,
                                       "batch_size": 3, "shard_size": 4, **kw})
    return build_cache(cfg, progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def reference(tiny_teacher_dir, text_file):
    """Packed ids and the teacher's own forward (output_hidden_states=True) on them."""
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    ids = pack_documents(iter_documents(str(text_file)), tok, SEQ_LEN, max_sequences=10)
    with torch.no_grad():
        out = model(torch.from_numpy(ids).long(), output_hidden_states=True)
    return ids, out, tok


@pytest.mark.parametrize("hidden_dtype", ["float16", "bfloat16"])
def test_cache_matches_direct_teacher_forward(tmp_path, tiny_teacher_dir, text_file, reference,
                                              hidden_dtype):
    ids, out, tok = reference
    manifest = build(tiny_teacher_dir, text_file, tmp_path / "c", hidden_dtype=hidden_dtype)
    assert manifest["status"] == "complete"
    reader = CacheReader(tmp_path / "c")
    assert len(reader) == 10 and reader.layers == (0, 2, 4)
    logp_full = torch.log_softmax(out.logits.float(), dim=-1)            # (N, L, V)
    for i in range(len(reader)):
        seq = reader.read(i)
        np.testing.assert_array_equal(seq["input_ids"], ids[i])
        ref_vals, ref_ids = logp_full[i].topk(8, dim=-1)
        np.testing.assert_array_equal(seq["teacher_ids"].astype(np.int64), ref_ids.numpy())
        np.testing.assert_allclose(seq["teacher_logp"].astype(np.float32), ref_vals.numpy(),
                                   rtol=1e-3, atol=2e-3)
        # tail = log of the mass outside the stored ids = log(1 - sum of top-k probs)
        tail_ref = torch.log1p(-ref_vals.exp().sum(-1)).numpy()
        np.testing.assert_allclose(seq["teacher_log_tail"].astype(np.float32), tail_ref,
                                   rtol=1e-3, atol=2e-3)
        for j in (0, 2, 4):
            got = decode_hidden(seq["hidden"][j], hidden_dtype).float()
            ref = out.hidden_states[j][i]
            tol = 1e-2 if hidden_dtype == "bfloat16" else 1e-3
            torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


def test_index_dtype_and_tail_mass(tmp_path, tiny_teacher_dir, text_file):
    build(tiny_teacher_dir, text_file, tmp_path / "c", top_k=4)
    reader = CacheReader(tmp_path / "c")
    seq = reader.read(3)
    assert seq["teacher_ids"].dtype == np.uint16  # vocab 259 fits the smallest index dtype
    total = np.exp(seq["teacher_logp"].astype(np.float64)).sum(-1) + np.exp(
        seq["teacher_log_tail"].astype(np.float64))
    np.testing.assert_allclose(total, 1.0, atol=5e-3)


def test_full_vocab_top_k_has_minus_inf_tail(tmp_path, tiny_teacher_dir, text_file):
    vocab = len(AutoTokenizer.from_pretrained(tiny_teacher_dir))
    build(tiny_teacher_dir, text_file, tmp_path / "c", top_k=vocab, layers="none", max_sequences=2)
    seq = CacheReader(tmp_path / "c").read(0)
    assert np.isneginf(seq["teacher_log_tail"]).all()
    assert seq["hidden"] == {}


def test_student_layers_option_caches_union_of_maps(tmp_path, tiny_teacher_dir, text_file):
    build(tiny_teacher_dir, text_file, tmp_path / "c", layers="all", student_layers=2,
          layer_maps=("uniform", "last"), max_sequences=2)
    # teacher 4 blocks, student 2: uniform {1: 2, 2: 4}, last {1: 3, 2: 4}
    assert CacheReader(tmp_path / "c").layers == (2, 3, 4)


def test_identical_builds_have_identical_fingerprints(tmp_path, tiny_teacher_dir, text_file):
    a = build(tiny_teacher_dir, text_file, tmp_path / "a")
    b = build(tiny_teacher_dir, text_file, tmp_path / "b", batch_size=4)
    c = build(tiny_teacher_dir, text_file, tmp_path / "c", top_k=7)
    assert a["fingerprint"] == b["fingerprint"]
    assert a["fingerprint"] != c["fingerprint"]


@pytest.mark.parametrize("flag", ["--layer-map", "--map"])
def test_cli_layer_map_and_its_deprecated_alias(tmp_path, tiny_teacher_dir, text_file, flag):
    """cache-build names the layer map --layer-map, as distill-from-cache does; the old --map
    still works (users' scripts) and warns once, naming the new flag."""
    from click.testing import CliRunner

    from unidistill.cli import main

    out = tmp_path / "c"
    result = CliRunner().invoke(main, [
        "cache-build", "--teacher", str(tiny_teacher_dir), "--data", str(text_file), "--out", str(out),
        "--seq-len", str(SEQ_LEN), "--top-k", "8", "--student-layers", "2", flag, "last",
        "--max-sequences", "2", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert CacheReader(out).layers == (3, 4)  # teacher 4 blocks, student 2: last {1: 3, 2: 4}
    warnings = [line for line in result.output.splitlines() if "deprecated" in line]
    if flag == "--map":
        assert warnings == ["warning: --map is deprecated, use --layer-map"]
    else:
        assert warnings == []


def test_cli_default_layer_maps_and_no_double_name(tmp_path, tiny_teacher_dir, text_file, monkeypatch):
    from click.testing import CliRunner

    import unidistill.cache_builder.build as build_module
    from unidistill.cli import main

    seen = []
    monkeypatch.setattr(build_module, "build_cache", lambda cfg, **kw: seen.append(cfg))
    base = ["cache-build", "--teacher", str(tiny_teacher_dir), "--data", str(text_file),
            "--out", str(tmp_path / "c"), "--quiet"]
    assert CliRunner().invoke(main, base).exit_code == 0
    assert seen[-1].layer_maps == ("uniform", "last")
    result = CliRunner().invoke(main, [*base, "--map", "last", "--layer-map", "uniform"])
    assert result.exit_code == 2 and "--layer-map only" in result.output
    assert "--map" not in CliRunner().invoke(main, ["cache-build", "--help"]).output.replace(
        "--layer-map", "")
