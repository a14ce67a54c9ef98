"""``unidistill generate``: greedy continuations of one held-out prompt, side by side."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from unidistill.cli import main
from unidistill.errors import ConfigError
from unidistill.generate import continue_prompt, held_out_prompt, parse_model_specs


def test_greedy_continuation_is_the_argmax_loop(tiny_teacher_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    prompt = "the cache stores teacher"
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=-1)
    expected = tok.decode(ids[0, -6:], skip_special_tokens=True)
    assert continue_prompt(model, tok, prompt, 6) == expected


def test_the_prompt_is_the_start_of_a_held_out_document(tiny_teacher_dir, text_file):
    from unidistill.text.data import iter_documents

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    prompt = held_out_prompt(str(text_file), tok, n_tokens=5)
    first_heldout = next(iter_documents(str(text_file), split="heldout"))
    assert prompt == tok.decode(tok(first_heldout, add_special_tokens=False)["input_ids"][:5])
    assert all(not d.startswith(prompt) for d in iter_documents(str(text_file), split="train"))


def test_cli_prints_each_model_after_the_prompt(tiny_teacher_dir, student_dir, text_file):
    res = CliRunner().invoke(main, ["generate", "--model", f"teacher={tiny_teacher_dir}",
                                    "--model", f"student={student_dir}", "--data", str(text_file),
                                    "--prompt-tokens", "6", "--max-new-tokens", "4", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()  # progress bars go to stderr
    assert lines[0].startswith("prompt: ")
    assert [line.split("|")[0].strip() for line in lines[2:]] == ["teacher", "student"]


@pytest.mark.parametrize("specs, match", [([], "no model"), (["a=x", "a=y"], "given twice"),
                                          (["=x"], "NAME=PATH")])
def test_bad_model_specs_are_refused(specs, match):
    with pytest.raises(ConfigError, match=match):
        parse_model_specs(specs)


def test_prompt_and_data_together_are_refused(tiny_teacher_dir, text_file):
    res = CliRunner().invoke(main, ["generate", "--model", str(tiny_teacher_dir), "--prompt", "hi",
                                    "--data", str(text_file)])
    assert res.exit_code == 2 and "not both" in res.output
