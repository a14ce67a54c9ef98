"""Training on several caches at once (``distill-from-cache --cache A --cache B``): the
concatenation, the refusal of caches that cannot share a run, the run record's list of caches
and resume against it, and ``ablate`` runs with their own lists.

The reference: caches A and B are built from two halves of a document list in which every
document is one sequence (31 tokens + EOS = seq_len), so the cache C of the whole list holds
exactly A's sequences followed by B's, and a run on [A, B] must be the run on C, step by step.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from unidistill.ablate import RUN_SETTINGS_FILE, ablate
from unidistill.cache_builder.build import build_cache
from unidistill.cache_builder.config import BuildConfig
from unidistill.cli import main
from unidistill.errors import CacheMismatchError, ConfigError
from unidistill.storage import CacheReader
from unidistill.storage.manifest import MANIFEST_KEY
from unidistill.text.splits import DEFAULT_HELDOUT_SHARE, in_split
from unidistill.trainer.dataset import CacheDataset
from unidistill.trainer.run import distill_from_cache
from unidistill.trainer.run_record import RUN_RECORD, check_checkpoint_caches

from .conftest import WORDS, args_for, train_losses, write_jsonl

SEQ_LEN = 32


def one_sequence_documents(tokenizer, n: int, seed: int = 0) -> list[str]:
    """``n`` training-split documents of exactly SEQ_LEN - 1 tokens each (EOS makes SEQ_LEN)."""
    rng, docs = random.Random(seed), []
    while len(docs) < n:
        words: list[str] = []
        for _ in range(200):
            trial = [*words, rng.choice(WORDS)]
            size = len(tokenizer(" ".join(trial), add_special_tokens=False)["input_ids"])
            if size <= SEQ_LEN - 1:
                words = trial
            if size == SEQ_LEN - 1:
                break
        text = " ".join(words)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) == SEQ_LEN - 1 \
                and in_split(text, "train", DEFAULT_HELDOUT_SHARE) and text not in docs:
            docs.append(text)
    return docs


def build(root, teacher, docs, name, **kw):
    data = write_jsonl(root / f"{name}.jsonl", docs)
    cfg = dict(teacher=str(teacher), data=str(data), out=str(root / name), seq_len=SEQ_LEN,
               top_k=16, layers="all", batch_size=4, shard_size=4, device="cpu")
    build_cache(BuildConfig(**{**cfg, **kw}), progress=False, log=lambda m: None)
    return root / name


@pytest.fixture(scope="module")
def docs(tiny_teacher_dir):
    return one_sequence_documents(AutoTokenizer.from_pretrained(tiny_teacher_dir), 16)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_teacher_dir, docs):
    """A (first 8 documents), B (last 8) and C (all 16): C's sequences are A's then B's."""
    root = tmp_path_factory.mktemp("multi")
    return {name: build(root, tiny_teacher_dir, part, name)
            for name, part in (("A", docs[:8]), ("B", docs[8:]), ("C", docs))}


def fingerprint(cache) -> str:
    return CacheReader(cache).manifest["fingerprint"]


def record_reads(monkeypatch) -> list[tuple[str, int]]:
    """Every (cache, sequence) the training data loader reads, in order."""
    seen: list[tuple[str, int]] = []
    original = CacheDataset.__getitems__

    def recording(self, indices):
        seen.extend((str(self.reader.root), int(i)) for i in indices)
        return original(self, indices)

    monkeypatch.setattr(CacheDataset, "__getitems__", recording)
    return seen


def test_the_reference_cache_holds_the_two_halves_in_order(caches):
    ids = {name: np.stack([CacheReader(c).read(i, layers=[], logits=False)["input_ids"]
                           for i in range(len(CacheReader(c)))]) for name, c in caches.items()}
    assert len(ids["A"]) == len(ids["B"]) == 8
    np.testing.assert_array_equal(ids["C"], np.concatenate([ids["A"], ids["B"]]))


def test_two_caches_train_as_the_cache_of_their_concatenation(tmp_path, caches, student_dir,
                                                              monkeypatch):
    seen = record_reads(monkeypatch)
    # 4 steps of 4 = one epoch of 16 sequences, shuffled (the same permutation for both runs)
    two = distill_from_cache([caches["A"], caches["B"]], str(student_dir), args_for(tmp_path / "ab"))
    assert sorted(seen) == sorted([(str(caches["A"]), i) for i in range(8)]
                                  + [(str(caches["B"]), i) for i in range(8)])  # each once
    assert [c for c, _ in seen] != sorted(c for c, _ in seen)  # shuffled across the two caches
    seen.clear()
    one = distill_from_cache(caches["C"], str(student_dir), args_for(tmp_path / "c"))
    assert sorted(seen) == [(str(caches["C"]), i) for i in range(16)]
    assert [s for s, *_ in train_losses(two)] == [1, 2, 3, 4]
    for got, want in zip(train_losses(two), train_losses(one), strict=True):
        assert got == pytest.approx(want, rel=1e-6)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "ab").state_dict()
    c = AutoModelForCausalLM.from_pretrained(tmp_path / "c").state_dict()
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)
    # the order matters: [B, A] puts other sequences at the same shuffled positions
    swapped = distill_from_cache([caches["B"], caches["A"]], str(student_dir),
                                 args_for(tmp_path / "ba", max_steps=1))
    assert train_losses(swapped)[0][1] != pytest.approx(train_losses(two)[0][1], rel=1e-6)


def test_the_command_line_and_a_config_file_take_several_caches(tmp_path, caches, student_dir):
    common = ["--student", str(student_dir), "--max-steps", "1", "--per-device-train-batch-size", "2",
              "--use-cpu", "--report-to", "none", "--save-strategy", "no"]
    res = CliRunner().invoke(main, ["distill-from-cache", "--cache", str(caches["A"]), "--cache",
                                    str(caches["B"]), "--out", str(tmp_path / "cli"), *common])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "cli" / RUN_RECORD).read_text())
    assert record["caches"] == [{"path": str(caches[n]), "fingerprint": fingerprint(caches[n])}
                                for n in "AB"]
    assert record["cache_fingerprints"] == sorted(fingerprint(caches[n]) for n in "AB")
    for value, expected in (([str(caches["B"]), str(caches["A"])], "BA"), (str(caches["C"]), "C")):
        config = tmp_path / f"{expected}.yaml"
        config.write_text(yaml.safe_dump({"cache": value}))
        out = tmp_path / f"config-{expected}"
        res = CliRunner().invoke(main, ["distill-from-cache", "--config", str(config),
                                        "--out", str(out), *common])
        assert res.exit_code == 0, res.output
        recorded = json.loads((out / RUN_RECORD).read_text())["caches"]
        assert [r["path"] for r in recorded] == [str(caches[n]) for n in expected]


def doctored(src, dst, edit):
    """A copy of cache ``src`` whose manifest ``edit`` changed (and whose fingerprint differs)."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "zarr.json").read_text())
    manifest = meta["attributes"][MANIFEST_KEY]
    edit(manifest)
    manifest["fingerprint"] = hashlib.sha256(str(dst).encode()).hexdigest()
    (dst / "zarr.json").write_text(json.dumps(meta))
    return dst


def _set(*path, value):
    def edit(manifest):
        node = manifest
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


@pytest.mark.parametrize("edit, field, values", [
    (_set("settings", "teacher", "weights_fingerprint", value="0" * 64), "teacher weight fingerprint",
     f"and {'0' * 64!r}"),
    (_set("settings", "tokenizer", "fingerprint", value="1" * 64), "tokenizer fingerprint",
     f"and {'1' * 64!r}"),
    (_set("layout", "vocab_size", value=999), "vocabulary size", "and 999"),
    (_set("layout", "seq_len", value=16), "sequence length", "32 and 16"),
    (_set("layout", "hidden_dtype", value="bfloat16"), "hidden dtype", "'float16' and 'bfloat16'"),
    (_set("layout", "layers", value=[0, 1, 2]), "hidden layers", "lacks [4]"),
], ids=["teacher", "tokenizer", "vocabulary", "seq_len", "hidden_dtype", "layers"])
def test_a_cache_that_differs_is_refused_naming_both_and_the_field(tmp_path, caches, student_dir,
                                                                   edit, field, values):
    other = doctored(caches["B"], tmp_path / "other", edit)
    with pytest.raises(CacheMismatchError) as e:
        distill_from_cache([caches["A"], other], str(student_dir), args_for(tmp_path / "run"))
    message = str(e.value)
    assert f"caches {caches['A']} and {other} differ in their {field}" in message
    assert values in message and "Fix:" in message
    assert not (tmp_path / "run" / RUN_RECORD).exists()  # refused before anything is written


@pytest.fixture(scope="module")
def variants(tmp_path_factory, tiny_teacher_dir, docs):
    """B's documents built with another k, other stored temperatures, and draws."""
    root = tmp_path_factory.mktemp("variants")
    return {"k8": build(root, tiny_teacher_dir, docs[8:], "k8", top_k=8),
            "t3": build(root, tiny_teacher_dir, docs[8:], "t3", temperatures="1,3"),
            "sampled": build(root, tiny_teacher_dir, docs[8:], "sampled", logits="sampled", samples=16)}


@pytest.mark.parametrize("name, field, values", [
    ("k8", "ids per position (top-k or draws)", "16 and 8"),
    ("t3", "stored KD temperatures", "[2.0] and [3.0]"),
    ("sampled", "logits mode", "'topk' and 'sampled'"),
])
def test_caches_built_with_other_logit_settings_are_refused(tmp_path, caches, variants, student_dir,
                                                            name, field, values):
    args = args_for(tmp_path / "run", kd_temperature=1.0, gamma=0.0, alpha=0.5, beta=0.5)
    with pytest.raises(CacheMismatchError) as e:
        distill_from_cache([caches["A"], variants[name]], str(student_dir), args)
    assert f"caches {caches['A']} and {variants[name]} differ in their {field}: {values}" in str(e.value)


def test_another_k_is_accepted_at_a_training_top_k_both_serve(tmp_path, caches, variants, student_dir):
    res = CliRunner().invoke(main, ["distill-from-cache", "--cache", str(caches["A"]), "--cache",
                                    str(variants["k8"]), "--student", str(student_dir), "--out",
                                    str(tmp_path / "refused"), "--max-steps", "1", "--use-cpu"])
    assert res.exit_code == 2 and "pass --top-k N with N at most the smaller k" in res.output
    trainer = distill_from_cache([caches["A"], variants["k8"]], str(student_dir),
                                 args_for(tmp_path / "run", kd_top_k=8, max_steps=1))
    assert train_losses(trainer)[0][3] > 0  # the KL trained on 8 ids + tail from both


def test_exact_caches_mix_only_with_the_same_head(tmp_path, tiny_teacher_dir, docs, student_dir):
    a = build(tmp_path, tiny_teacher_dir, docs[:8], "xa", logits="exact")
    b = build(tmp_path, tiny_teacher_dir, docs[8:], "xb", logits="exact")
    args = args_for(tmp_path / "run", max_steps=1, gamma=0.0)
    assert train_losses(distill_from_cache([a, b], str(student_dir), args))[0][3] > 0
    head = CacheReader(a).manifest["head"]["sha256"]
    other = doctored(b, tmp_path / "other-head", _set("head", "sha256", value="f" * 64))
    with pytest.raises(CacheMismatchError) as e:
        distill_from_cache([a, other], str(student_dir), args_for(tmp_path / "run2", gamma=0.0))
    assert (f"differ in their teacher output head (sha256 of lm_head.safetensors): {head!r} and "
            f"{'f' * 64!r}") in str(e.value)
    assert "exact-logits caches can be mixed only when they hold the same teacher head" in str(e.value)


def test_the_same_cache_twice_is_refused(tmp_path, caches, student_dir):
    with pytest.raises(ConfigError, match="are the same cache .* give each cache once"):
        distill_from_cache([caches["A"], caches["A"]], str(student_dir), args_for(tmp_path / "r"))


def test_resume_continues_on_the_same_caches_and_refuses_others(tmp_path, caches, student_dir):
    out = tmp_path / "run"
    first = train_losses(distill_from_cache([caches["A"], caches["B"]], str(student_dir), args_for(out)))
    checkpoint = out / "checkpoint-2"
    assert json.loads((checkpoint / RUN_RECORD).read_text())["cache_fingerprints"] == sorted(
        fingerprint(caches[n]) for n in "AB")
    resumed = distill_from_cache([caches["A"], caches["B"]], str(student_dir), args_for(out),
                                 resume_from_checkpoint=str(checkpoint))
    again = [r for r in train_losses(resumed) if r[0] > 2]
    assert [r[0] for r in again] == [3, 4]
    for got, want in zip(again, first[2:], strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    for given, says in (([caches["B"], caches["A"]], "the same caches in another order"),
                        ([caches["A"]], f"not on {caches['A']} (fingerprint"),
                        ([caches["A"], caches["C"]], "Resume with the recorded --cache")):
        with pytest.raises(CacheMismatchError, match="checkpoint .*checkpoint-2 was trained on") as e:
            distill_from_cache(given, str(student_dir), args_for(out), resume_from_checkpoint=str(checkpoint))
        assert says in str(e.value)
        assert f"{caches['B']} (fingerprint {fingerprint(caches['B'])[:16]})" in str(e.value)


def test_a_single_cache_record_of_the_earlier_format_is_still_read(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / RUN_RECORD).write_text(json.dumps({"cache": {"path": "/c", "fingerprint": "a" * 64}}))
    check_checkpoint_caches(str(checkpoint), [("/c", "a" * 64)])  # the same cache: resumes
    with pytest.raises(CacheMismatchError, match=f"trained on the cache /c \\(fingerprint {'a' * 16}\\)"):
        check_checkpoint_caches(str(checkpoint), [("/c", "a" * 64), ("/d", "b" * 64)])
    (checkpoint / RUN_RECORD).write_text(json.dumps({"caches": []}))
    with pytest.raises(ConfigError, match="its 'caches' entry is \\[\\]"):
        check_checkpoint_caches(str(checkpoint), [("/c", "a" * 64)])


def test_a_single_cache_run_recorded_in_the_earlier_format_resumes(tmp_path, caches, student_dir):
    out = tmp_path / "run"
    first = train_losses(distill_from_cache(caches["A"], str(student_dir), args_for(out, max_steps=2,
                                                                                    save_steps=1)))
    for folder in (out, out / "checkpoint-1"):  # as an earlier unidistill wrote them
        record = json.loads((folder / RUN_RECORD).read_text())
        entry = record.pop("caches")[0]
        del record["cache_fingerprints"]
        (folder / RUN_RECORD).write_text(json.dumps({**record, "cache": entry}))
    resumed = distill_from_cache(caches["A"], str(student_dir), args_for(out, max_steps=2, save_steps=1),
                                 resume_from_checkpoint=str(out / "checkpoint-1"))
    assert [r for r in train_losses(resumed) if r[0] == 2] == [pytest.approx(first[1], rel=1e-5)]
    with pytest.raises(CacheMismatchError, match=f"trained on the cache {caches['A']}"):
        distill_from_cache([caches["A"], caches["B"]], str(student_dir), args_for(out, max_steps=2),
                           resume_from_checkpoint=str(out / "checkpoint-1"))


@pytest.mark.parametrize("value", [[], 3, ["a", 3], ""])
def test_a_variant_cache_that_is_no_path_or_list_is_refused(value):
    from unidistill.ablate import check_variants

    with pytest.raises(ConfigError, match=f"run 'mix' has cache={value!r}".replace("[", "\\[")):
        check_variants({}, [{"name": "mix", "cache": value}])


def test_ablate_runs_train_on_their_own_cache_lists(tmp_path, caches, student_dir, tiny_teacher_dir,
                                                    text_file):
    common = dict(per_device_train_batch_size=4, max_steps=1, use_cpu=True, report_to=[],
                  save_strategy="no", logging_steps=1)
    messages: list[str] = []

    def run(mixed):
        messages.clear()
        variants = [{"name": "one", "alpha": 1.0, "beta": 0.0},
                    {"name": "mix", "alpha": 1.0, "beta": 0.0, "cache": [str(c) for c in mixed]}]
        return ablate(caches["A"], str(student_dir), str(tiny_teacher_dir), str(text_file),
                      tmp_path, variants=variants, common=common, eval_sequences=2, device="cpu",
                      progress=False, log=messages.append)

    table = run([caches["A"], caches["B"]])
    recorded = {n: json.loads((tmp_path / n / RUN_SETTINGS_FILE).read_text())["settings"]
                for n in ("one", "mix")}
    assert recorded["one"]["cache_fingerprint"] == fingerprint(caches["A"])  # as before lists
    assert recorded["mix"]["cache_fingerprints"] == [fingerprint(caches[n]) for n in "AB"]
    assert [c["path"] for c in json.loads((tmp_path / "mix" / RUN_RECORD).read_text())["caches"]] \
        == [str(caches["A"]), str(caches["B"])]
    assert {r["name"]: r["settings"].get("cache") for r in table["rows"]}["mix"] == \
        [str(caches["A"]), str(caches["B"])]
    run([caches["A"], caches["B"]])
    assert messages == []  # nothing changed: nothing redone
    run([caches["B"], caches["A"]])  # another order is another run
    assert [m for m in messages if "run 'mix': training again" in m]
    assert not [m for m in messages if "'one'" in m]
    assert json.loads((tmp_path / "mix" / RUN_SETTINGS_FILE).read_text())["settings"][
        "cache_fingerprints"] == [fingerprint(caches[n]) for n in "BA"]
