"""unidistill ablate and report end to end on tiny models: files exist, tables parse, numbers
are finite and consistent with the evaluations they come from."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from unidistill.ablate import (
    REPLACED_DIR,
    heldout_sets,
    RUN_SETTINGS_FILE,
    ablate,
    ablation_plan,
    check_variants,
    format_table,
    parse_variant,
    ratio,
    read_variants_file,
    recovery,
)
from unidistill.cache_builder.build import build_cache
from unidistill.cache_builder.config import BuildConfig
from unidistill.cli import main
from unidistill.errors import ConfigError
from unidistill.storage import CacheReader
from unidistill.trainer.run_record import RUN_RECORD


def test_recovery_is_the_share_of_the_log_perplexity_gap_closed():
    assert recovery(3.0, 4.0, 2.0) == pytest.approx(50.0)
    assert recovery(2.0, 4.0, 2.0) == pytest.approx(100.0)
    assert recovery(4.5, 4.0, 2.0) == pytest.approx(-25.0)  # a run can make things worse
    assert recovery(None, 4.0, 2.0) is None and recovery(3.0, 2.0, 2.0) is None
    assert ratio(30.0, 20.0) == pytest.approx(1.5) and ratio(None, 2.0) is None and ratio(1.0, 0.0) is None


def test_ablation_plan_merges_file_flags_and_variants(tmp_path):
    """The rules the ablate command applies: file variants then --variant ones; the run defaults,
    then the file's common options, then the flags that were given."""
    path = tmp_path / "v.yaml"
    path.write_text("common: {max_steps: 5, logging_steps: 3}\nvariants: [{name: a, beta: 0}]\n")
    variants, common = ablation_plan(read_variants_file(path), ["b:gamma=1"], max_steps=7, seed=None)
    assert variants == [{"name": "a", "beta": 0}, {"name": "b", "gamma": 1}]
    assert common == {"report_to": [], "logging_steps": 3, "save_strategy": "no", "max_steps": 7}
    path.write_text("- just a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping with a 'variants' list"):
        read_variants_file(path)
    result = CliRunner().invoke(main, ["ablate", "--cache", "c", "--student", "s", "--teacher", "t",
                                       "--heldout", "h", "--out", str(tmp_path / "o"),
                                       "--variants", str(path)])
    assert result.exit_code == 2 and "must hold a mapping with a 'variants' list" in result.output


def test_variant_parsing_and_bad_variants():
    assert parse_variant("ce+kl:alpha=0.5,beta=0.5,gamma=0,layer-map=last") == {
        "name": "ce+kl", "alpha": 0.5, "beta": 0.5, "gamma": 0, "layer_map": "last"}
    with pytest.raises(ConfigError, match="has no name"):
        parse_variant("alpha=1")
    with pytest.raises(ConfigError, match=r"sets unknown options \['alpah'\]"):
        check_variants({}, [{"name": "x", "alpah": 1}])
    with pytest.raises(ConfigError, match=r"run names \['x'\] appear more than once"):
        check_variants({}, [{"name": "x"}, {"name": "x"}])
    with pytest.raises(ConfigError, match="folder name"):
        check_variants({}, [{"name": "../x"}])
    with pytest.raises(ConfigError, match="no runs to compare"):
        check_variants({}, [])


@pytest.fixture(scope="module")
def heldout_cache(tmp_path_factory, tiny_teacher_dir, text_file):
    """The conftest cache's settings on the held-out split of the same file."""
    out = tmp_path_factory.mktemp("heldout") / "c"
    build_cache(BuildConfig(teacher=str(tiny_teacher_dir), data=str(text_file), out=str(out),
                            split="heldout", seq_len=32, top_k=16, layers="all", max_sequences=4,
                            batch_size=4, shard_size=4, device="cpu"),
                progress=False, log=lambda m: None)
    return out


def test_ablate_then_report(tmp_path, cache, heldout_cache, student_dir, tiny_teacher_dir, text_file):
    variants = tmp_path / "variants.yaml"
    variants.write_text("common: {learning_rate: 0.003, per_device_train_batch_size: 4}\n"
                        "variants:\n"
                        "  - {name: ce, alpha: 1.0, beta: 0.0, gamma: 0.0}\n"
                        "  - {name: ce+kl, alpha: 0.5, beta: 0.5, gamma: 0.0}\n")
    out = tmp_path / "abl"
    argv = ["ablate", "--cache", str(cache), "--student", str(student_dir), "--teacher",
            str(tiny_teacher_dir), "--heldout", str(text_file), "--heldout-cache", str(heldout_cache),
            "--out", str(out), "--variants", str(variants),
            "--variant", "ce+kl+hidden:alpha=0.4,beta=0.4,gamma=0.2,hidden_loss=mse",
            "--max-steps", "3", "--use-cpu", "--eval-sequences", "4", "--device", "cpu"]
    res = CliRunner().invoke(main, argv)
    assert res.exit_code == 0, res.output
    table = json.loads((out / "ablation.json").read_text())
    names = [r["name"] for r in table["rows"]]
    assert names == ["teacher", "student (before)", "ce", "ce+kl", "ce+kl+hidden"]
    fingerprint = CacheReader(cache).manifest["fingerprint"]
    assert table["cache_fingerprint"] == fingerprint
    assert all(json.loads((out / name / RUN_RECORD).read_text())["caches"][0]["fingerprint"] == fingerprint
               for name in names[2:])
    rows = {r["name"]: r for r in table["rows"]}
    assert rows["teacher"]["recovery_pct"] == pytest.approx(100.0)
    assert rows["student (before)"]["recovery_pct"] == pytest.approx(0.0)
    assert rows["teacher"]["top1_agreement"] == pytest.approx(1.0)
    assert rows["teacher"]["perplexity_ratio"] == pytest.approx(1.0)
    assert rows["teacher"]["accuracy_ratio"] == pytest.approx(1.0)
    teacher_ev = json.loads((out / "_teacher" / "eval.json").read_text())
    assert table["uniform_nll"] == pytest.approx(math.log(table["vocab_size"]))
    assert table["vocab_size"] == teacher_ev["vocab_size"]
    for name in ("student (before)", "ce", "ce+kl", "ce+kl+hidden"):
        r = rows[name]
        ev = json.loads((out / ("_student" if name == "student (before)" else name) / "eval.json").read_text())
        assert r["perplexity"] == ev["perplexity"] and math.isfinite(r["perplexity"])
        assert r["accuracy"] == ev["accuracy"] and 0 <= r["accuracy"] <= 1
        # the ratios are the ratios of the evaluated numbers
        assert r["perplexity_ratio"] == pytest.approx(ev["perplexity"] / teacher_ev["perplexity"], rel=1e-12)
        assert r["accuracy_ratio"] == pytest.approx(ev["accuracy"] / teacher_ev["accuracy"], rel=1e-12)
        assert r["recovery_pct"] == pytest.approx(recovery(ev["nll"], rows["student (before)"]["nll"],
                                                           rows["teacher"]["nll"]))
    for name in ("ce", "ce+kl", "ce+kl+hidden"):
        r = rows[name]
        assert r["tokens_per_s"] > 0 and 0 <= r["top1_agreement"] <= 1
    assert rows["ce+kl+hidden"]["settings"]["hidden_loss"] == "mse"
    md = (out / "ablation.md").read_text().splitlines()
    header = next(line for line in md if line.startswith("| run |"))
    assert [c.strip() for c in header.split("|")[1:-1]] == [
        "run", "settings", "perplexity", "perplexity ÷ teacher", "next-token accuracy",
        "accuracy ÷ teacher", "log-ppl gap closed %", "top-1 agreement", "KL to teacher", "tokens/s"]
    body = [line for line in md if line.startswith("| ce")]
    assert len(body) == 3 and all(len(line.split("|")) == 12 for line in body)
    assert any(line.startswith("Uniform guess over the V = ") for line in md)

    # a rerun keeps the finished runs (same numbers, no retraining)
    stamp = (out / "ce" / "eval.json").stat().st_mtime_ns
    again = CliRunner().invoke(main, argv)
    assert again.exit_code == 0, again.output
    assert (out / "ce" / "eval.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "ablation.json").read_text())["rows"] == table["rows"]

    (out / "ablation.md").unlink()  # report renders the table again from ablation.json
    res = CliRunner().invoke(main, ["report", str(out)])
    assert res.exit_code == 0, res.output
    for png in ("recovery.png", "ce/losses.png", "ce+kl+hidden/losses.png", "ce+kl+hidden/layer_cosine.png"):
        path = out / png
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert not (out / "ce" / "layer_cosine.png").exists()  # narrower, no trained projectors
    assert (out / "ablation.md").read_text().splitlines() == md


def test_report_renders_the_new_columns_and_the_uniform_baseline(tmp_path):
    """The table: ratios and accuracy as given, the uniform guess, and a warning when the untrained
    student is worse than it; an older table without the new keys renders with '-'."""
    row = dict(settings={}, tokens_per_s=None, top1_agreement=None, kl_to_teacher=None)
    table = {"cache": "c", "teacher": "t", "student": "s", "heldout": "h", "vocab_size": 49152,
             "uniform_nll": math.log(49152),
             "rows": [{**row, "name": "teacher", "perplexity": 16.3, "perplexity_ratio": 1.0,
                       "accuracy": 0.5, "accuracy_ratio": 1.0, "recovery_pct": 100.0, "nll": 2.79},
                      {**row, "name": "student (before)", "perplexity": 7.9e7, "nll": 18.2,
                       "perplexity_ratio": 4.85e6, "accuracy": 0.05, "accuracy_ratio": 0.1,
                       "recovery_pct": 0.0},
                      {**row, "name": "old", "perplexity": 800.0, "nll": 6.68, "recovery_pct": 74.7,
                       "settings": {"alpha": 1.0}}]}
    (tmp_path / "ablation.json").write_text(json.dumps(table))
    res = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "ablation.md").read_text()
    assert md == format_table(table)
    assert "ln V = 10.80 (perplexity 49,152)" in md and "is worse than that guess" in md
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in md.splitlines() if line.startswith("| ") and not line.startswith("| run")}
    assert lines["student (before)"][2:6] == ["4.85e+06", "0.050", "0.10", "0.0"]
    assert lines["teacher"][2:6] == ["1.00", "0.500", "1.00", "100.0"]
    assert lines["old"][2:6] == ["-", "-", "-", "74.7"]
    assert (tmp_path / "recovery.png").read_bytes()[:4] == b"\x89PNG"


def _run_files(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.safetensors")}


def test_ablate_redoes_what_changed_and_keeps_the_rest(tmp_path, tmp_path_factory, cache, heldout_cache,
                                                       student_dir, tiny_teacher_dir, text_file):
    """A changed variant retrains that run (old folder kept aside), changed eval sequences or
    held-out cache re-evaluate without retraining; the table shows the new numbers, never a
    stale eval.json. Each step fails on a version that reuses any existing eval.json."""
    from unidistill.cache_builder.build import build_cache
    from unidistill.cache_builder.config import BuildConfig
    from unidistill.evaluate import evaluate

    common = dict(learning_rate=0.003, per_device_train_batch_size=4, max_steps=2, use_cpu=True,
                  report_to=[], save_strategy="no", logging_steps=1)
    ce = dict(alpha=1.0, beta=0.0, gamma=0.0)
    ce_kl = dict(alpha=0.5, beta=0.5, gamma=0.0)
    messages: list[str] = []

    def run(variants, **kw):
        messages.clear()
        kw = {"eval_sequences": 2, "heldout_cache": heldout_cache, **kw}
        table = ablate(cache, str(student_dir), str(tiny_teacher_dir), str(text_file), tmp_path,
                       variants=variants, common=common, device="cpu", progress=False,
                       log=messages.append, **kw)
        return table, {r["name"]: r for r in table["rows"]}

    def evaluated(folder, **kw):
        kw = {"max_sequences": 2, "cache": str(heldout_cache), **kw}
        return evaluate(str(folder), data=str(text_file), device="cpu", progress=False, **kw)

    _, first = run([{"name": "a", **ce}, {"name": "b", **ce_kl}])
    stamps = {n: _run_files(tmp_path / n) for n in "ab"}
    _, same = run([{"name": "a", **ce}, {"name": "b", **ce_kl}])
    assert same == first and messages == []  # nothing changed: nothing redone
    assert {n: _run_files(tmp_path / n) for n in "ab"} == stamps

    # 1. run a now has b's settings: retrained (lands where b is), old folder moved aside
    _, changed = run([{"name": "a", **ce_kl}, {"name": "b", **ce_kl}])
    assert changed["a"]["settings"]["alpha"] == 0.5
    assert changed["a"]["nll"] != pytest.approx(first["a"]["nll"], rel=1e-6)
    assert changed["a"]["nll"] == pytest.approx(changed["b"]["nll"], rel=1e-5)
    assert json.loads((tmp_path / "a" / RUN_RECORD).read_text())["arguments"]["alpha"] == 0.5
    record = json.loads((tmp_path / "a" / RUN_SETTINGS_FILE).read_text())
    assert record["trained"] and record["settings"]["arguments"]["alpha"] == 0.5
    kept = list((tmp_path / REPLACED_DIR).glob("a-*"))
    assert len(kept) == 1 and json.loads((kept[0] / "eval.json").read_text())["nll"] == first["a"]["nll"]
    assert _run_files(tmp_path / "b") == stamps["b"]
    assert [m for m in messages if "run 'a': training again" in m and "alpha: 1.0 before, 0.5 now" in m]
    assert not [m for m in messages if "'b'" in m or m.startswith(("teacher", "student"))]
    stamps["a"] = _run_files(tmp_path / "a")

    # 2. more eval sequences: every evaluation redone, nothing retrained
    _, more = run([{"name": "a", **ce_kl}, {"name": "b", **ce_kl}], eval_sequences=3)
    assert {n: _run_files(tmp_path / n) for n in "ab"} == stamps
    for name, folder in (("teacher", tiny_teacher_dir), ("student (before)", student_dir),
                         ("a", tmp_path / "a")):
        fresh = evaluated(folder, max_sequences=3)
        assert fresh.sequences == 3 and more[name]["nll"] == pytest.approx(fresh.nll, rel=1e-6)
        assert more[name]["kl_to_teacher"] == pytest.approx(fresh.kl_to_teacher, rel=1e-6)
    assert more["a"]["nll"] != pytest.approx(changed["a"]["nll"], rel=1e-6)
    assert json.loads((tmp_path / "a" / "eval.json").read_text())["sequences"] == 3
    assert len([m for m in messages if "eval_sequences: 2 before, 3 now" in m]) == 4

    # 3. another held-out cache (other sequence length and k): evaluations redone against it
    other = tmp_path_factory.mktemp("heldout") / "c"
    build_cache(BuildConfig(teacher=str(tiny_teacher_dir), data=str(text_file), out=str(other),
                            split="heldout", seq_len=16, top_k=8, layers="none", max_sequences=4, batch_size=4,
                            shard_size=4, device="cpu"), progress=False, log=lambda m: None)
    table, moved = run([{"name": "a", **ce_kl}, {"name": "b", **ce_kl}], heldout_cache=other)
    fingerprint = CacheReader(other).manifest["fingerprint"]
    assert table["heldout_cache_fingerprint"] == fingerprint
    for name, folder in (("teacher", tiny_teacher_dir), ("b", tmp_path / "b")):
        fresh = evaluated(folder, cache=str(other))
        assert moved[name]["nll"] == pytest.approx(fresh.nll, rel=1e-6)
        assert moved[name]["kl_to_teacher"] == pytest.approx(fresh.kl_to_teacher, rel=1e-6)
    assert json.loads((tmp_path / "b" / "eval.json").read_text())["cache_fingerprint"] == fingerprint
    assert moved["b"]["nll"] != pytest.approx(changed["b"]["nll"], rel=1e-6)
    assert {n: _run_files(tmp_path / n) for n in "ab"} == stamps


def test_report_of_an_empty_folder_says_what_it_needs(tmp_path):
    res = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "trainer_state.json" in res.output


def test_an_online_run_trains_against_the_live_teacher(tmp_path, cache, student_dir, tiny_teacher_dir,
                                                       text_file):
    """online=16 sees exactly the top-16 the cache holds (up to fp16), so it must land where the
    cached run lands; online=full sees all ids and lands elsewhere."""
    from unidistill.ablate import ablate

    common = dict(learning_rate=0.003, per_device_train_batch_size=4, max_steps=2, use_cpu=True,
                  report_to=[], save_strategy="no", logging_steps=1)
    ce_kl = dict(alpha=0.5, beta=0.5, gamma=0.0)
    table = ablate(cache, str(student_dir), str(tiny_teacher_dir), str(text_file), tmp_path,
                   variants=[{"name": "cached", **ce_kl}, {"name": "top16", "online": 16, **ce_kl},
                             {"name": "full", "online": "full", **ce_kl}],
                   common=common, eval_sequences=4, device="cpu", progress=False)
    rows = {r["name"]: r for r in table["rows"]}
    assert rows["top16"]["settings"]["online"] == 16 and "online" not in rows["cached"]["settings"]
    assert rows["top16"]["nll"] == pytest.approx(rows["cached"]["nll"], rel=1e-3)
    assert rows["full"]["nll"] != pytest.approx(rows["cached"]["nll"], rel=1e-6)
    assert math.isfinite(rows["full"]["nll"])
    with pytest.raises(ConfigError, match=r"online='some'; expected 'full'"):
        check_variants({}, [{"name": "x", "online": "some"}])


def test_ablate_on_several_heldout_sets(tmp_path, cache, heldout_cache, student_dir, tiny_teacher_dir,
                                        text_file, documents):
    """Every model is evaluated on each held-out set (eval.json for the first, eval.<name>.json for
    the others, each recording what produced it); the table holds every set's numbers; a rerun
    keeps them; a set that overlaps the training cache is refused."""
    from .conftest import write_jsonl

    from unidistill.errors import DataError

    other = write_jsonl(tmp_path / "prose.jsonl", documents[60:])
    other_cache = tmp_path / "prose-cache"
    build_cache(BuildConfig(teacher=str(tiny_teacher_dir), data=str(other), out=str(other_cache),
                            split="all", seq_len=32, top_k=16, layers="none", max_sequences=4,
                            batch_size=4, shard_size=4, device="cpu"), progress=False, log=lambda m: None)
    out = tmp_path / "abl"
    argv = ["ablate", "--cache", str(cache), "--student", str(student_dir), "--teacher",
            str(tiny_teacher_dir), "--heldout", str(text_file), "--heldout-split", "heldout",
            "--heldout-cache", str(heldout_cache), "--heldout", str(other), "--heldout-split", "all",
            "--heldout-cache", str(other_cache), "--out", str(out),
            "--variant", "ce:alpha=1,beta=0,gamma=0", "--variant", "kd:alpha=0,beta=1,gamma=0",
            "--max-steps", "2", "--use-cpu", "--eval-sequences", "3", "--device", "cpu"]
    res = CliRunner().invoke(main, argv)
    assert res.exit_code == 0, res.output
    table = json.loads((out / "ablation.json").read_text())
    assert [h["name"] for h in table["heldouts"]] == ["train", "prose"]
    assert [h["eval_file"] for h in table["heldouts"]] == ["eval.json", "eval.prose.json"]
    assert table["heldouts"][1]["cache_fingerprint"] == CacheReader(other_cache).manifest["fingerprint"]
    rows = {r["name"]: r for r in table["rows"]}
    for name, folder in (("teacher", "_teacher"), ("student (before)", "_student"), ("ce", "ce"), ("kd", "kd")):
        first = json.loads((out / folder / "eval.json").read_text())
        second = json.loads((out / folder / "eval.prose.json").read_text())
        assert first["produced_by"]["heldout"]["data"] == str(text_file)
        assert second["produced_by"]["heldout"]["data"] == str(other) and second["produced_by"]["split"] == "all"
        r = rows[name]
        assert r["perplexity"] == first["perplexity"] == r["heldout_sets"]["train"]["perplexity"]
        assert r["heldout_sets"]["prose"]["perplexity"] == second["perplexity"] != first["perplexity"]
        assert r["heldout_sets"]["prose"]["kl_to_teacher"] == second["kl_to_teacher"]
        teacher_second = json.loads((out / "_teacher" / "eval.prose.json").read_text())
        assert r["heldout_sets"]["prose"]["perplexity_ratio"] == pytest.approx(
            second["perplexity"] / teacher_second["perplexity"], rel=1e-12)
    assert rows["teacher"]["heldout_sets"]["prose"]["top1_agreement"] == pytest.approx(1.0)
    assert rows["student (before)"]["heldout_sets"]["prose"]["recovery_pct"] == pytest.approx(0.0)
    md = (out / "ablation.md").read_text().splitlines()
    header = [c.strip() for c in next(line for line in md if line.startswith("| run |")).split("|")[1:-1]]
    assert header[:4] == ["run", "settings", "train: perplexity", "train: perplexity ÷ teacher"]
    assert header[9:11] == ["prose: perplexity", "prose: perplexity ÷ teacher"] and len(header) == 17
    kd_line = next(line for line in md if line.startswith("| kd |"))
    assert f"{rows['kd']['heldout_sets']['prose']['perplexity']:.3f}" in kd_line
    assert len(kd_line.split("|")) == 19

    logged: list[str] = []
    again = ablate(cache, str(student_dir), str(tiny_teacher_dir), [str(text_file), str(other)], out,
                   variants=[{"name": "ce", "alpha": 1, "beta": 0, "gamma": 0},
                             {"name": "kd", "alpha": 0, "beta": 1, "gamma": 0}],
                   common={"report_to": [], "logging_steps": 1, "save_strategy": "no", "max_steps": 2,
                           "use_cpu": True},
                   heldout_split=["heldout", "all"], heldout_cache=[heldout_cache, other_cache],
                   eval_sequences=3, device="cpu", progress=False, log=logged.append)
    assert logged == [] and again["rows"] == table["rows"]  # everything kept
    res = CliRunner().invoke(main, ["report", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "ablation.md").read_text().splitlines() == md

    with pytest.raises(DataError, match="share documents"):  # the training text, split all
        ablate(cache, str(student_dir), str(tiny_teacher_dir), [str(other), str(text_file)], tmp_path / "x",
               variants=[{"name": "ce"}], heldout_split="all", device="cpu", progress=False)


def test_heldout_sets_pair_the_options_in_order():
    sets = heldout_sets(["builtin:stdlib_docs", "builtin:kjv_bible"], "heldout", ["a", "b"])
    assert [(h.name, h.data, h.split, h.cache) for h in sets] == [
        ("stdlib_docs", "builtin:stdlib_docs", "heldout", "a"), ("kjv_bible", "builtin:kjv_bible", "heldout", "b")]
    assert heldout_sets("data/x.jsonl")[0].name == "x" and heldout_sets("data/x.jsonl")[0].cache is None
    with pytest.raises(ConfigError, match="one per --heldout"):
        heldout_sets(["a.jsonl", "b.jsonl"], None, ["c"])
    with pytest.raises(ConfigError, match="give one for all or one per --heldout"):
        heldout_sets(["a.jsonl", "b.jsonl"], ["x", "y", "z"])
    with pytest.raises(ConfigError, match=r"names \['t'\] appear more than once"):
        heldout_sets(["one/t.jsonl", "two/t.jsonl"])


def test_an_argument_added_since_a_run_was_recorded_counts_only_off_its_default():
    from unidistill.ablate import same_training, training_settings

    student = {"files": "abc"}
    now = training_settings({"alpha": 1.0, "beta": 0.0, "gamma": 0.0}, {"learning_rate": 3e-4},
                            ["fp"], student, None)
    # the record an older unidistill wrote, before hidden_warmup_steps existed
    old = {**now, "arguments": {k: v for k, v in now["arguments"].items() if k != "hidden_warmup_steps"}}
    assert old != now and same_training(old, now)
    warm = training_settings({"alpha": 0.4, "beta": 0.4, "gamma": 0.2, "hidden_warmup_steps": 10},
                             {"learning_rate": 3e-4}, ["fp"], student, None)
    old_warm = {**warm, "arguments": {k: v for k, v in warm["arguments"].items()
                                      if k != "hidden_warmup_steps"}}
    assert not same_training(old_warm, warm)  # set off its default: not what the old run did
    other = {**old, "arguments": {**old["arguments"], "learning_rate": 1e-3}}
    assert not same_training(other, now)  # an existing argument that differs still differs
    assert not same_training({**old, "cache_fingerprint": "other"}, now)
    assert not same_training(None, now) and not same_training({"x": 1}, now)


def test_tokens_per_second_counts_only_the_last_sessions_steps():
    """A run resumed at step 8 of 10 trains 2 steps in its last session: its speed is those 2
    steps' samples over that session's runtime (the Trainer's train_samples_per_second), not all
    10 steps' tokens over it, which overstated a resumed run fivefold."""
    from types import SimpleNamespace

    from unidistill.ablate.runs import _tokens_per_second

    trainer = SimpleNamespace(
        state=SimpleNamespace(global_step=10, log_history=[
            {"loss": 1.0, "step": 9},
            # 2 steps x 4 sequences in 4.0 s: what transformers logs for that session
            {"train_runtime": 4.0, "train_samples_per_second": 2.0, "train_steps_per_second": 0.5}]),
        args=SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=1, world_size=1),
        train_dataset=SimpleNamespace(seq_len=32))  # a CacheDataset or several caches' concatenation
    assert _tokens_per_second(trainer) == 2.0 * 32  # the old count gave 10 * 4 * 32 / 4.0 = 320
    trainer.state.log_history = [{"loss": 1.0}]
    assert _tokens_per_second(trainer) is None


def test_a_negative_kl_estimate_is_shown_not_clamped():
    """A sampled cache's KL is an unbiased estimate and can be below 0: the table shows it. Only
    a value that would print as -0.0000 is shown as 0.0000."""
    from unidistill.ablate.table import _cells

    base = dict(perplexity=10.0, perplexity_ratio=1.0, accuracy=0.5, accuracy_ratio=1.0,
                recovery_pct=None, top1_agreement=0.9)
    assert _cells({**base, "kl_to_teacher": -0.0123})[-1] == "-0.0123"
    assert _cells({**base, "kl_to_teacher": -1e-9})[-1] == "0.0000"
    assert _cells({**base, "kl_to_teacher": 0.25})[-1] == "0.2500"
