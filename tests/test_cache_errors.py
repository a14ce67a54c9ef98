"""Bad input to cache-build gets a clear error and writes nothing."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from unidistill.cli import main

from .conftest import write_jsonl


def invoke(teacher, data, out, *extra):
    args = ["cache-build", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
            "--seq-len", "32", "--top-k", "8", "--layers", "1,4", "--max-sequences", "4",
            "--device", "cpu", "--quiet", *extra]
    return CliRunner().invoke(main, args)


def assert_refused(result, *fragments, out=None):
    assert result.exit_code == 2, result.output
    for f in fragments:
        assert f in result.output, result.output
    assert "Traceback" not in result.output
    if out is not None:
        assert not out.exists(), "a refused build must write nothing"


def test_missing_model_path(tmp_path, text_file):
    out = tmp_path / "c"
    assert_refused(invoke(tmp_path / "no-model", text_file, out), "no-model", "does not exist", out=out)


def test_missing_data_path(tmp_path, tiny_teacher_dir):
    out = tmp_path / "c"
    assert_refused(invoke(tiny_teacher_dir, tmp_path / "nope.jsonl", out),
                   "nope.jsonl does not exist", out=out)


def test_empty_data(tmp_path, tiny_teacher_dir):
    out = tmp_path / "c"
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    assert_refused(invoke(tiny_teacher_dir, empty, out), "0 tokens in 0 documents", out=out)


def test_fewer_tokens_than_one_sequence(tmp_path, tiny_teacher_dir):
    out = tmp_path / "c"
    short = write_jsonl(tmp_path / "short.jsonl", ["the cache"])
    assert_refused(invoke(tiny_teacher_dir, short, out), "fewer than one sequence of seq_len=32",
                   "lower --seq-len", out=out)


def test_unknown_text_field(tmp_path, tiny_teacher_dir, text_file):
    out = tmp_path / "c"
    assert_refused(invoke(tiny_teacher_dir, text_file, out, "--text-field", "body"),
                   "text field 'body' not found", "['id', 'text']", out=out)


@pytest.mark.parametrize("layers", ["5", "-1", "1,2,9"])
def test_layer_out_of_range_says_valid_range(tmp_path, tiny_teacher_dir, text_file, layers):
    out = tmp_path / "c"
    assert_refused(invoke(tiny_teacher_dir, text_file, out, "--layers", layers),
                   "valid layers are 0..4", out=out)


def test_layers_not_integers(tmp_path, tiny_teacher_dir, text_file):
    out = tmp_path / "c"
    assert_refused(invoke(tiny_teacher_dir, text_file, out, "--layers", "six"),
                   "'six' is not a comma-separated list", out=out)


@pytest.mark.parametrize("k, fragment", [("0", "top_k must be >= 1, got 0"),
                                         ("100000", "larger than the teacher's vocabulary (259)")])
def test_top_k_out_of_range(tmp_path, tiny_teacher_dir, text_file, k, fragment):
    out = tmp_path / "c"
    assert_refused(invoke(tiny_teacher_dir, text_file, out, "--top-k", k), fragment, out=out)


def test_seq_len_below_two(tmp_path, tiny_teacher_dir, text_file):
    out = tmp_path / "c"
    assert_refused(invoke(tiny_teacher_dir, text_file, out, "--seq-len", "1"),
                   "seq_len must be >= 2", "got 1", out=out)


def test_output_path_is_a_file(tmp_path, tiny_teacher_dir, text_file):
    out = tmp_path / "c"
    out.write_text("precious")
    assert_refused(invoke(tiny_teacher_dir, text_file, out), "is a file", "Choose another --out")
    assert out.read_text() == "precious"


def test_output_folder_with_other_files_is_refused(tmp_path, tiny_teacher_dir, text_file):
    out = tmp_path / "c"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert_refused(invoke(tiny_teacher_dir, text_file, out), "holds no unidistill cache")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_unknown_gguf_file(tmp_path, tiny_teacher_dir, text_file):
    out = tmp_path / "c"
    assert_refused(invoke(tiny_teacher_dir, text_file, out, "--gguf-file", "x.gguf"),
                   "GGUF file 'x.gguf' not found", out=out)


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_exact_logits_refuse_a_rounded_final_state(tmp_path, tiny_teacher_dir, text_file, dtype):
    out = tmp_path / "c"
    assert_refused(invoke(tiny_teacher_dir, text_file, out, "--logits", "exact", "--hidden-dtype",
                          dtype), f"--hidden-dtype {dtype} would round", "--hidden-dtype float16",
                   out=out)


@pytest.mark.parametrize("mode, flag", [("sampled", "serves T = 1 only"),
                                        ("exact", "serves every temperature")])
def test_temperatures_are_refused_where_a_cache_cannot_use_them(tmp_path, tiny_teacher_dir,
                                                                text_file, mode, flag):
    out = tmp_path / "c"
    assert_refused(invoke(tiny_teacher_dir, text_file, out, "--logits", mode, "--temperatures", "1,2"),
                   flag, out=out)


@pytest.mark.parametrize("spec", ["1,x", "0,2", "-1", ","])
def test_bad_temperatures_are_refused(tmp_path, tiny_teacher_dir, text_file, spec):
    out = tmp_path / "c"
    assert_refused(invoke(tiny_teacher_dir, text_file, out, "--temperatures", spec),
                   "--temperatures", out=out)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_hidden_states_beyond_float16_are_refused_not_stored_as_inf(dtype):
    import torch

    from unidistill.cache_builder.capture import TeacherRunner
    from unidistill.errors import ConfigError

    from .conftest import make_llama

    model = make_llama(64)
    big = lambda _m, _i, out: (out[0] * 0 + 7e4,) + tuple(out[1:]) if isinstance(out, tuple) \
        else out * 0 + 7e4  # noqa: E731
    model.model.layers[0].register_forward_hook(big)  # before the runner's capture hook
    runner = TeacherRunner(model, [1], 4, hidden_dtype=dtype)
    with pytest.raises(ConfigError, match=r"layer 1 reach \|x\| = 7e\+04.*--hidden-dtype bfloat16"):
        runner(torch.randint(0, 64, (2, 70)).numpy())
