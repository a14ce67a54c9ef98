"""Conversations in the cache build (issue 17 step 2b): the stored masks are text.chat's, the
counts and cache-info's share, the refusals (before anything is written), the format versions,
the student template check, and training and evaluation on a packed chat cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer

from tests.conftest import args_for, chat_build_config
from unidistill.cache_builder.build import build_cache
from unidistill.cache_builder.config import BuildConfig
from unidistill.cli import main
from unidistill.errors import CacheMismatchError, ConfigError
from unidistill.evaluate import evaluate
from unidistill.models.batch import loss_mask
from unidistill.models.packing import segment_kwargs
from unidistill.storage import CacheReader
from unidistill.storage.info import cache_info
from unidistill.storage.manifest import read_manifest, read_unit_markers
from unidistill.storage.reader import check_format_version
from unidistill.text.chat import render_conversation, template_probe
from unidistill.trainer.dataset import check_student_template
from unidistill.trainer.run import distill_from_cache


def test_a_chat_cache_stores_the_masks_text_chat_computes(chat_cache, chat_teacher_dir, conversations):
    tok = AutoTokenizer.from_pretrained(chat_teacher_dir)
    reader = CacheReader(chat_cache)
    assert reader.manifest["format_version"] == 2 and reader.layout.packing == "documents"
    data = reader.manifest["settings"]["data"]
    assert data["format"] == "conversations" and data["train_on"] == "assistant"
    assert data["mask_method"] == "prefix-diff" and data["probe_ids"] == template_probe(tok)
    seen = {}
    for i in range(len(reader)):
        seq = reader.read(i, layers=[], logits=False)
        for doc in np.unique(seq["document_ids"]):
            if doc >= 0:
                at = seq["document_ids"] == doc
                seen[int(doc)] = (seq["input_ids"][at].tolist(), seq["target_mask"][at].tolist())
    assert sorted(seen) == list(range(len(conversations)))  # one segment each, in data order
    for doc, messages in enumerate(conversations):
        want = render_conversation(tok, messages, "assistant")
        assert seen[doc] == (list(want.ids), list(want.target)), doc


def test_unit_markers_count_targets_padding_and_segments_and_cache_info_shows_the_share(chat_cache):
    reader = CacheReader(chat_cache)
    markers = read_unit_markers(reader.location, reader.layout.n_units)
    target = reader.group["target_mask"][:]
    docs = reader.group["document_ids"][:]
    totals = reader.manifest["build"]["tokens"]
    assert totals == {"targets": int(target.sum()), "padding": int((docs == -2).sum()),
                      "segments": reader.manifest["settings"]["data"]["stats"]["segments"]}
    assert sum(m["tokens"]["targets"] for m in markers.values()) == totals["targets"]
    info = cache_info(chat_cache)
    share = totals["targets"] / info["n_tokens"]
    assert f"share of trained tokens {share:.1%} (assistant)" in info["packing_description"]
    shown = CliRunner().invoke(main, ["cache-info", str(chat_cache)])
    assert shown.exit_code == 0 and f"share of trained tokens {share:.1%}" in shown.output


@pytest.mark.parametrize("kw, message", [
    (dict(packing="stream"), "--packing stream with conversations.*Use --packing documents"),
    (dict(messages_field=None, train_on="assistant"), "--train-on assistant with plain text.*--train-on all"),
    (dict(hidden_dtype="int8"), "--hidden-dtype int8 with --packing documents.*float16"),
    (dict(packing="rows"), "--packing 'rows' is not one of"),
])
def test_refusals_say_what_and_how_before_anything_is_written(tmp_path, chat_teacher_dir, chat_file,
                                                              kw, message):
    out = tmp_path / "c"
    with pytest.raises(ConfigError, match=message):
        build_cache(chat_build_config(chat_teacher_dir, chat_file, out, **kw), progress=False,
                    log=lambda m: None)
    assert not out.exists()


def test_flash_attention_is_refused_for_packed_rows(chat_teacher_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(chat_teacher_dir)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="flash_attention_2.*attn_implementation='sdpa'"):
        segment_kwargs(model, torch.zeros(1, 4, dtype=torch.long))
    assert segment_kwargs(model, None) == {}  # a stream batch: the forward as before


def test_format_v1_still_reads_and_a_v2_cache_is_refused_by_a_v1_reader(cache, chat_cache):
    v1 = CacheReader(cache)
    assert v1.manifest["format_version"] == 1 and "packing" not in v1.manifest["layout"]
    assert v1.layout.packing == "stream" and set(v1.read(0)) >= {"input_ids"}
    assert "target_mask" not in v1.read(0)
    with pytest.raises(CacheMismatchError, match="format version 2, this unidistill reads version 1"):
        check_format_version(read_manifest(chat_cache), chat_cache, readable=(1,))


def test_the_student_template_must_render_the_probe_as_the_teacher_did(chat_cache, chat_teacher_dir):
    reader = CacheReader(chat_cache)
    same = AutoTokenizer.from_pretrained(chat_teacher_dir)
    check_student_template(reader, same)  # the teacher's tokenizer (as a pruned student has) passes
    other = AutoTokenizer.from_pretrained(chat_teacher_dir)
    other.chat_template = other.chat_template.replace("'\n' + message['content']", "':' + message['content']")
    assert other.chat_template != same.chat_template
    # "<|im_start|>system" then ":" where the teacher's template has a newline
    at = len(same("<|im_start|>system", add_special_tokens=False)["input_ids"])
    with pytest.raises(CacheMismatchError, match=rf"first difference at token {at}, id \d+ from the "
                                                 r"student, \d+ in the cache \(tokens \[':', 'Ċ'\]\)"):
        check_student_template(reader, other)
    none = AutoTokenizer.from_pretrained(chat_teacher_dir)
    none.chat_template = None
    with pytest.raises(CacheMismatchError, match="cannot render them.*has no chat template"):
        check_student_template(reader, none)


def test_distill_and_evaluate_on_a_packed_chat_cache(tmp_path, chat_cache, chat_student_dir):
    args = args_for(tmp_path / "run", max_steps=3, per_device_train_batch_size=2, save_steps=100,
                    gamma=0.2, hidden_loss="cosine", hidden_warmup_steps=1)
    trainer = distill_from_cache(chat_cache, str(chat_student_dir), args)
    losses = [h for h in trainer.state.log_history if "loss" in h and "loss_hidden" in h]
    assert len(losses) == 3 and all(np.isfinite(h["loss"]) for h in losses)
    assert "loss_ce" not in losses[0] and "loss_ce" in losses[1]  # the warm-up step, then all terms
    result = evaluate(str(tmp_path / "run"), cache=str(chat_cache), max_sequences=None,
                      batch_size=2, device="cpu", progress=False, num_workers=0)
    reader = CacheReader(chat_cache)
    masks = [loss_mask(torch.from_numpy(reader.group["target_mask"][i:i + 1].astype(bool)),
                       torch.from_numpy(reader.group["document_ids"][i:i + 1])) for i in range(len(reader))]
    scored = int(sum(m.sum() for m in masks))
    assert result.scored_positions == scored
    assert result.target_share == pytest.approx(scored / (len(reader) * reader.layout.seq_len))
    assert result.kl_to_teacher is not None and result.top1_agreement is not None
    assert result.cache_perplexity is not None


def test_builtin_python_qa_builds_through_the_cli(tmp_path, chat_teacher_dir):
    out = tmp_path / "qa"
    ran = CliRunner().invoke(main, ["cache-build", "--teacher", str(chat_teacher_dir), "--data",
                                    "builtin:python_qa", "--split", "heldout", "--out", str(out),
                                    "--seq-len", "256", "--top-k", "4", "--layers", "none",
                                    "--max-sequences", "3", "--pack-window", "8", "--quiet",
                                    "--device", "cpu"])
    assert ran.exit_code == 0, ran.output
    manifest = read_manifest(out)
    assert manifest["layout"]["packing"] == "documents" and manifest["format_version"] == 2
    assert manifest["settings"]["data"]["messages_field"] == "messages"
    assert 0 < manifest["build"]["tokens"]["targets"] < 3 * 256
    refused = CliRunner().invoke(main, ["cache-build", "--teacher", str(chat_teacher_dir), "--data",
                                        "builtin:pydoc_topics", "--train-on", "assistant",
                                        "--packing", "documents", "--out", str(tmp_path / "no")])
    assert refused.exit_code == 2 and "--train-on assistant with plain text" in refused.output
    assert not (tmp_path / "no").exists()
    assert json.loads(json.dumps(manifest))  # the manifest is plain JSON


def test_documents_and_none_caches_train_together_but_not_with_a_stream_one(tmp_path, chat_cache,
                                                                           chat_teacher_dir, chat_file,
                                                                           text_file):
    from unidistill.trainer.caches import check_caches_agree

    none = tmp_path / "none"
    build_cache(chat_build_config(chat_teacher_dir, chat_file, none, packing="none", max_sequences=4),
                progress=False, log=lambda m: None)
    stream = tmp_path / "stream"
    build_cache(chat_build_config(chat_teacher_dir, text_file, stream, messages_field=None,
                                  max_sequences=4), progress=False, log=lambda m: None)
    assert CacheReader(stream).manifest["format_version"] == 1
    check_caches_agree([CacheReader(chat_cache), CacheReader(none)], kd_top_k=None,
                       teacher_layers=set(), reads_hidden=False)
    with pytest.raises(CacheMismatchError, match="packing"):
        check_caches_agree([CacheReader(chat_cache), CacheReader(stream)], kd_top_k=None,
                           teacher_layers=set(), reads_hidden=False)
