"""Bad input to distill-from-cache is refused before any training step, with a clear message."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from unidistill.cli import main
from unidistill.storage.manifest import UNITS_DIR

from .conftest import make_llama


def run(cache, student, out, *extra):
    args = ["distill-from-cache", "--cache", str(cache), "--student", str(student), "--out", str(out),
            "--max-steps", "2", "--per-device-train-batch-size", "2", "--use-cpu", *extra]
    return CliRunner().invoke(main, args)


def assert_refused(result, *fragments, out=None):
    assert result.exit_code == 2, result.output
    for f in fragments:
        assert f in result.output, result.output
    if out is not None:
        assert not (out / "checkpoint-1").exists() and not (out / "model.safetensors").exists()


@pytest.mark.parametrize("extra, fragments", [
    (["--alpha", "0", "--beta", "0", "--gamma", "0"], ["all 0", "set at least one"]),
    (["--beta", "-0.1"], ["beta (KL weight) is -0.1", "must be >= 0"]),
    (["--temperature", "0"], ["temperature is 0.0", "must be > 0"]),
    (["--top-k", "64"], ["top_k=64 asked", "stores k=16"]),
    (["--layer-map", "sideways"], ["sideways"]),
    (["--align-layers", "all", "--layer-map", '{"1": 2, "2": 4}'], []),
])
def test_bad_settings_are_refused(tmp_path, cache, student_dir, extra, fragments):  # noqa: F811
    result = run(cache, student_dir, tmp_path / "run", *extra)
    if not fragments:  # a valid explicit map whose layers are all cached trains fine
        assert result.exit_code == 0, result.output
        return
    assert_refused(result, *fragments, out=tmp_path / "run")


def test_mapped_layer_missing_from_cache_lists_cached_ones(tmp_path, cache, student_dir):  # noqa: F811
    # the cache holds teacher layers 1..4; an explicit map onto the embeddings (0) is not cached
    result = run(cache, student_dir, tmp_path / "run", "--layer-map", '{"1": 0}', "--align-layers", "all",
                 "--gamma", "0.2")
    assert_refused(result, "[0]", "[1, 2, 3, 4]", out=tmp_path / "run")


def test_incomplete_cache_is_refused(tmp_path, cache, student_dir):  # noqa: F811
    partial = tmp_path / "partial"
    shutil.copytree(cache, partial)
    import json
    meta = json.loads((partial / "zarr.json").read_text())
    meta["attributes"]["unidistill"]["status"] = "building"
    (partial / "zarr.json").write_text(json.dumps(meta))
    (partial / UNITS_DIR / "000001.json").unlink()
    assert_refused(run(partial, student_dir, tmp_path / "run"), "is not complete", "rerun the same")


def test_student_with_smaller_vocabulary_names_both_sizes(tmp_path, cache, tiny_teacher_dir):  # noqa: F811
    # a larger head (padded beyond the tokenizer) is accepted: tests/test_user_models.py
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    other = tmp_path / "other"
    make_llama(len(tok) - 7, hidden=24, layers=2).save_pretrained(other)
    tok.save_pretrained(other)
    assert_refused(run(cache, other, tmp_path / "run"), f"{len(tok) - 7} entries",
                   f"fewer than the cache's teacher {len(tok)}")


def test_student_with_other_tokenizer_gives_both_fingerprints(tmp_path, cache, tiny_teacher_dir):  # noqa: F811
    # same vocabulary size, but another EOS: packed ids would not mean the same thing
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir, eos_token="<bos>")
    other = tmp_path / "other"
    make_llama(len(tok), hidden=24, layers=2).save_pretrained(other)
    tok.save_pretrained(other)
    assert_refused(run(cache, other, tmp_path / "run"), "tokenizer (fingerprint",
                   "differs from the cache's (fingerprint")


def test_student_deeper_than_teacher(tmp_path, cache, tiny_teacher_dir):  # noqa: F811
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    deep = tmp_path / "deep"
    make_llama(len(tok), hidden=24, layers=6).save_pretrained(deep)
    tok.save_pretrained(deep)
    assert_refused(run(cache, deep, tmp_path / "run", "--layer-map", "last"), "student has 6 blocks",
                   "teacher only 4")


def test_config_file_sets_options_and_rejects_unknown_keys(tmp_path, cache, student_dir):  # noqa: F811
    good = tmp_path / "run.yaml"
    good.write_text("alpha: 0.4\nbeta: 0.4\ngamma: 0.2\nhidden-loss: nmse\nlearning_rate: 0.001\n")
    out = tmp_path / "run"
    result = run(cache, student_dir, out, "--config", str(good), "--gamma", "0.3")
    assert result.exit_code == 0, result.output
    import json
    recorded = json.loads((out / "unidistill_run.json").read_text())["arguments"]
    assert recorded["alpha"] == 0.4 and recorded["hidden_loss"] == "nmse"
    assert recorded["gamma"] == 0.3  # the flag overrides the file
    bad = tmp_path / "bad.yaml"
    bad.write_text("alpha: 0.4\nbogus_knob: 3\n")
    result = run(cache, student_dir, tmp_path / "run2", "--config", str(bad))
    assert result.exit_code == 2 and "unknown keys" in result.output and "bogus_knob" in result.output


def test_the_recipe_defaults_are_the_same_from_the_cli_and_the_arguments():
    """ablate and --config users build DistillationArguments; CLI users get click's defaults: the
    measured recipe must be the default of both."""
    import dataclasses

    from unidistill.cli import distill_from_cache_cmd
    from unidistill.trainer.arguments import DistillationArguments

    cli = {p.name: p.default for p in distill_from_cache_cmd.params}
    fields = {f.name: f.default for f in dataclasses.fields(DistillationArguments)}
    for name in ("learning_rate", "lr_scheduler_type", "alpha", "beta", "gamma", "kd_temperature",
                 "kl_direction", "hidden_loss", "layer_map", "align_layers", "hidden_warmup_steps",
                 "logits_chunk_size"):
        assert cli[name] == fields[name], name
    assert fields["learning_rate"] == 3e-4 and fields["lr_scheduler_type"] == "cosine"
