"""unidistill ablate and report end to end on tiny models: files exist, tables parse, numbers
are finite and consistent with the evaluations they come from."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from unidistill.ablate import check_variants, parse_variant, recovery
from unidistill.cache_builder.build import build_cache
from unidistill.cache_builder.config import BuildConfig
from unidistill.cli import main
from unidistill.errors import ConfigError
from unidistill.storage import CacheReader
from unidistill.trainer.run import RUN_RECORD


def test_recovery_is_the_share_of_the_log_perplexity_gap_closed():
    assert recovery(3.0, 4.0, 2.0) == pytest.approx(50.0)
    assert recovery(2.0, 4.0, 2.0) == pytest.approx(100.0)
    assert recovery(4.5, 4.0, 2.0) == pytest.approx(-25.0)  # a run can make things worse
    assert recovery(None, 4.0, 2.0) is None and recovery(3.0, 2.0, 2.0) is None


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
    assert all(json.loads((out / name / RUN_RECORD).read_text())["cache"]["fingerprint"] == fingerprint
               for name in names[2:])
    rows = {r["name"]: r for r in table["rows"]}
    assert rows["teacher"]["recovery_pct"] == pytest.approx(100.0)
    assert rows["student (before)"]["recovery_pct"] == pytest.approx(0.0)
    assert rows["teacher"]["top1_agreement"] == pytest.approx(1.0)
    for name in ("ce", "ce+kl", "ce+kl+hidden"):
        r = rows[name]
        ev = json.loads((out / name / "eval.json").read_text())
        assert r["perplexity"] == ev["perplexity"] and math.isfinite(r["perplexity"])
        assert r["recovery_pct"] == pytest.approx(recovery(ev["nll"], rows["student (before)"]["nll"],
                                                           rows["teacher"]["nll"]))
        assert r["tokens_per_s"] > 0 and 0 <= r["top1_agreement"] <= 1
    assert rows["ce+kl+hidden"]["settings"]["hidden_loss"] == "mse"
    md = (out / "ablation.md").read_text().splitlines()
    body = [line for line in md if line.startswith("| ce")]
    assert len(body) == 3 and all(len(line.split("|")) == 9 for line in body)

    # a rerun keeps the finished runs (same numbers, no retraining)
    stamp = (out / "ce" / "eval.json").stat().st_mtime_ns
    again = CliRunner().invoke(main, argv)
    assert again.exit_code == 0, again.output
    assert (out / "ce" / "eval.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "ablation.json").read_text())["rows"] == table["rows"]

    res = CliRunner().invoke(main, ["report", str(out)])
    assert res.exit_code == 0, res.output
    for png in ("recovery.png", "ce/losses.png", "ce+kl+hidden/losses.png", "ce+kl+hidden/layer_cosine.png"):
        path = out / png
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert not (out / "ce" / "layer_cosine.png").exists()  # narrower, no trained projectors


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
