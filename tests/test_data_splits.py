"""Held-out splits of local data: train and held-out never share a document, in every consumer."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from unidistill.cache_builder import capture
from unidistill.cache_builder.build import build_cache
from unidistill.cache_builder.config import BuildConfig
from unidistill.text.data import iter_documents, pack_documents
from unidistill.text.splits import check_caches_apart, in_split, key_position
from unidistill.cli import main
from unidistill.errors import CacheMismatchError, DataError
from unidistill.storage import CacheReader

from .conftest import make_documents, write_jsonl

SHARE = 0.3  # large enough that a 120-document file holds a cache's worth of held-out text


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    """40 .txt files (one document each) in two sub-folders, plus one duplicate document."""
    root = tmp_path_factory.mktemp("folder")
    docs = make_documents(40, seed=3)
    for i, doc in enumerate(docs):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        (sub / f"doc{i:02d}.txt").write_text(doc)
    (root / "copy_of_doc07.txt").write_text(docs[7])
    return root


def split_docs(data, split, share=SHARE):
    return list(iter_documents(str(data), split=split, heldout_share=share))


def by_rule(docs, split, share=SHARE):
    """The split applied by hand: held out when the text's hash position is below the share."""
    return [d for d in docs if (key_position(d) < share) == (split == "heldout")]


@pytest.mark.parametrize("source", ["jsonl", "folder"])
def test_local_train_and_heldout_partition_the_documents(source, text_file, text_folder, documents):
    data = text_file if source == "jsonl" else text_folder
    train, heldout, every = (split_docs(data, s) for s in ("train", "heldout", "all"))
    assert heldout and train
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(every)
    if source == "jsonl":
        assert every == documents  # all = the file, in file order
    # membership is decided by the text alone: the rule, applied to each document by hand
    assert heldout == by_rule(every, "heldout") and train == by_rule(every, "train")


def test_duplicate_documents_land_on_the_same_side(text_folder):
    dup = (text_folder / "copy_of_doc07.txt").read_text()
    train, heldout = split_docs(text_folder, "train"), split_docs(text_folder, "heldout")
    side = heldout if in_split(dup, "heldout", SHARE) else train
    assert side.count(dup) == 2 and (train + heldout).count(dup) == 2


def test_split_does_not_depend_on_row_order(tmp_path, documents):
    shuffled = list(documents)
    np.random.default_rng(0).shuffle(shuffled)
    a = write_jsonl(tmp_path / "a.jsonl", documents)
    b = write_jsonl(tmp_path / "b.jsonl", shuffled)
    assert set(split_docs(a, "heldout")) == set(split_docs(b, "heldout"))


def test_default_share_holds_out_about_one_document_in_twenty(tmp_path):
    docs = make_documents(2000, seed=5, min_words=5, max_words=12)
    path = write_jsonl(tmp_path / "many.jsonl", docs)
    held = list(iter_documents(str(path), split="heldout"))
    assert 60 <= len(held) <= 140  # 5 % of 2000 = 100; binomial sd ~ 10


@pytest.mark.parametrize("split", ["validation", "test", "Train"])
def test_unknown_local_split_is_refused(text_file, split):
    with pytest.raises(DataError, match=r"split .* does not exist; expected one of \('train', 'heldout', 'all'\)"):
        list(iter_documents(str(text_file), split=split))


@pytest.mark.parametrize("share", [0.0, 1.0, -0.1, 1.5])
def test_held_out_share_outside_zero_one_is_refused(text_file, share):
    with pytest.raises(DataError, match="between 0 and 1"):
        list(iter_documents(str(text_file), split="train", heldout_share=share))


def test_held_out_share_is_refused_for_sources_with_fixed_splits():
    with pytest.raises(DataError, match="only local files and folders are split by share"):
        list(iter_documents("builtin:pydoc_topics", split="train", heldout_share=0.2))


def test_cli_refuses_an_unknown_split_before_loading_anything(tmp_path, text_file):
    result = CliRunner().invoke(main, ["cache-build", "--teacher", str(tmp_path / "no-such-model"),
                                       "--data", str(text_file), "--split", "validation",
                                       "--out", str(tmp_path / "c")])
    assert result.exit_code == 2
    assert "split 'validation'" in result.output and "('train', 'heldout', 'all')" in result.output
    assert not (tmp_path / "c").exists()


# --- the consumers: cache-build, evaluate, prune -----------------------------------------------

def cached_documents(cache, eos: int) -> set[tuple[int, ...]]:
    """The whole documents in a cache, as token ids: packing cut one token stream into its
    sequences, so the sequences joined in order give the stream back; a document is what lies
    between two EOS."""
    reader = CacheReader(cache)
    stream = np.concatenate([reader.read(i)["input_ids"] for i in range(len(reader))]).tolist()
    ends = [j for j, t in enumerate(stream) if t == eos]
    return {tuple(stream[a + 1:b]) for a, b in zip(ends, ends[1:])}


def tokenized(tokenizer, docs) -> set[tuple[int, ...]]:
    return {tuple(ids) for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]}


def build(teacher, data, out, split, **kw):
    cfg = BuildConfig(teacher=str(teacher), data=str(data), out=str(out), split=split, seq_len=32,
                      top_k=4, layers="none", batch_size=4, shard_size=4, device="cpu",
                      heldout_share=SHARE, **kw)
    return build_cache(cfg, progress=False, log=lambda m: None)


@pytest.mark.parametrize("source", ["jsonl", "folder"])
def test_train_and_heldout_caches_share_no_document(tmp_path, tiny_teacher_dir, text_file,
                                                    text_folder, source):
    data = text_file if source == "jsonl" else text_folder
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    train_m = build(tiny_teacher_dir, data, tmp_path / "train", "train")
    held_m = build(tiny_teacher_dir, data, tmp_path / "heldout", "heldout")
    train_docs = tokenized(tok, split_docs(data, "train"))
    held_docs = tokenized(tok, split_docs(data, "heldout"))
    assert not train_docs & held_docs  # the test's documents are distinct token sequences
    in_train = cached_documents(tmp_path / "train", tok.eos_token_id)
    in_held = cached_documents(tmp_path / "heldout", tok.eos_token_id)
    assert len(in_train) >= 5 and len(in_held) >= 3
    assert in_train <= train_docs and not in_train & held_docs
    assert in_held <= held_docs and not in_held & train_docs
    for m, split in ((train_m, "train"), (held_m, "heldout")):
        assert m["settings"]["data"]["split"] == split
        assert m["settings"]["data"]["heldout_share"] == SHARE
    check_caches_apart(train_m["settings"]["data"], held_m["settings"]["data"])  # they agree


def test_resuming_with_another_held_out_share_is_refused(tmp_path, tiny_teacher_dir, text_file,
                                                         monkeypatch):
    calls = {"n": 0}
    real = capture.TeacherRunner.launch

    def fail_second_unit(self, ids, **kw):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("stopped")
        return real(self, ids, **kw)

    monkeypatch.setattr(capture.TeacherRunner, "launch", fail_second_unit)
    with pytest.raises(RuntimeError, match="stopped"):
        build(tiny_teacher_dir, text_file, tmp_path / "c", "train", max_sequences=8)
    monkeypatch.setattr(capture.TeacherRunner, "launch", real)
    with pytest.raises(CacheMismatchError, match=r"settings\.data\.heldout_share: 0\.3 in the cache, 0\.2 now"):
        build_cache(BuildConfig(teacher=str(tiny_teacher_dir), data=str(text_file),
                                out=str(tmp_path / "c"), split="train", seq_len=32, top_k=4,
                                layers="none", batch_size=4, shard_size=4, device="cpu",
                                max_sequences=8, heldout_share=0.2),
                    progress=False, log=lambda m: None)


def test_evaluate_reads_the_split_it_is_given(tiny_teacher_dir, text_file, documents):
    from unidistill.evaluate import evaluate

    from .test_evaluate import reference_nll

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    nll = {}
    for split in ("heldout", "train"):
        res = evaluate(str(tiny_teacher_dir), data=str(text_file), split=split, heldout_share=SHARE,
                       seq_len=16, max_sequences=40, device="cpu", progress=False)
        ids = pack_documents(by_rule(documents, split), tok, 16, 40)
        assert (res.sequences, res.tokens) == (ids.shape[0], ids.size)
        assert res.nll == pytest.approx(reference_nll(tiny_teacher_dir, ids), rel=1e-5)
        nll[split] = res.nll
    assert nll["heldout"] != nll["train"]
    default = evaluate(str(tiny_teacher_dir), data=str(text_file), heldout_share=SHARE, seq_len=16,
                       max_sequences=40, device="cpu", progress=False)
    assert default.nll == nll["heldout"]  # evaluation reads the held-out split by default


def test_evaluate_refuses_an_unknown_split_before_loading_the_model(tmp_path, text_file):
    from unidistill.evaluate import evaluate

    with pytest.raises(DataError, match="split 'validation'"):
        evaluate(str(tmp_path / "no-such-model"), data=str(text_file), split="validation",
                 device="cpu", progress=False)


def test_prune_calibrates_on_the_split_it_is_given(tmp_path, tiny_teacher_dir, text_file, documents,
                                                    monkeypatch):
    from unidistill.pruning import prune as prune_module

    seen = {}
    real = prune_module.prune_model

    def spy(model, **kw):
        seen["calib_ids"] = kw["calib_ids"]
        return real(model, **kw)

    monkeypatch.setattr(prune_module, "prune_model", spy)
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    for split in ("heldout", "train"):
        prune_module.prune(str(tiny_teacher_dir), str(tmp_path / split), mlp_keep=0.5,
                           calib_data=str(text_file), calib_split=split, calib_heldout_share=SHARE,
                           calib_sequences=4, seq_len=16, device="cpu", progress=False)
        expected = pack_documents(by_rule(documents, split), tok, 16, 4)
        np.testing.assert_array_equal(seen.pop("calib_ids"), expected)


# --- the agreement check between a training cache and a held-out cache -------------------------

def data_record(source, split, share=0.05, config=None):
    return {"source": source, "config": config, "split": split, "heldout_share": share}


@pytest.mark.parametrize("train, heldout, error", [
    (data_record("d.jsonl", "train"), data_record("d.jsonl", "heldout"), None),
    (data_record("d.jsonl", "train"), data_record("other.jsonl", "train"), None),
    (data_record("d.jsonl", "train"), data_record("d.jsonl", "train"), "share documents"),
    (data_record("d.jsonl", "train"), data_record("d.jsonl", "all"), "share documents"),
    (data_record("d.jsonl", "all"), data_record("d.jsonl", "heldout"), "share documents"),
    (data_record("d.jsonl", "train", 0.05), data_record("d.jsonl", "heldout", 0.1),
     "held-out share 0.05 and the held-out cache with 0.1"),
    (data_record("org/set", "train", None, "c"), data_record("org/set", "test", None, "c"), None),
    (data_record("org/set", "train", None, "c"), data_record("org/set", "train", None, "c"),
     "share documents"),
])
def test_check_caches_apart(train, heldout, error):
    if error is None:
        check_caches_apart(train, heldout)
    else:
        with pytest.raises(DataError, match=error):
            check_caches_apart(train, heldout)


def test_ablate_refuses_held_out_data_that_shares_documents_with_the_cache(cache, text_file):
    from unidistill.ablate import heldout_apart as _heldout_apart

    # the training cache (a local file's train split, default share) and its own held-out split
    assert _heldout_apart(cache, str(text_file), None) == {"heldout_share": 0.05}
    assert _heldout_apart(cache, "builtin:pydoc_topics", None) == {}
    with pytest.raises(DataError, match="split 'train' and 'train'"):
        _heldout_apart(cache, str(text_file), cache)  # the training cache as held-out cache
