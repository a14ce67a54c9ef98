"""``cache-build --generate``: a cache of the teacher's own answers.

The must-show: the answers a generated cache stores are the teacher's own ``model.generate`` output
for the same seed, greedy and sampled, read back from the cache; the targets are exactly the
answer tokens. Also: generate's logits agree with the cached forward, a stopped build resumes to
the same cache, other decoding settings are refused on resume, bad options are refused before
anything is written, and a student trains on such a cache.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from unidistill.cache_builder import generated_rows
from unidistill.cache_builder.build import build_cache
from unidistill.cache_builder.generation import (
    conversation_prompts,
    stop_token_ids,
    usable_prompts,
)
from unidistill.cli import main
from unidistill.errors import CacheMismatchError, ConfigError
from unidistill.storage import CacheReader
from unidistill.text.data import iter_conversations

from .conftest import args_for, chat_build_config
from .test_cache_resume import assert_same_cache
from .test_generation import reference_answers, rows_by_prompt

SEQ_LEN, MAX_NEW, BATCH, SHARD = 96, 8, 2, 4
SAMPLED = dict(sample=True, gen_temperature=0.8, gen_top_p=0.9, gen_seed=5)


def generated_config(teacher, data, out, **kw):
    return chat_build_config(teacher, data, out, generate=True, max_new_tokens=MAX_NEW,
                             seq_len=SEQ_LEN, batch_size=BATCH, shard_size=SHARD,
                             **{"packing": None, **kw})


def build(teacher, data, out, **kw):
    return build_cache(generated_config(teacher, data, out, **kw), progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def greedy_cache(tmp_path_factory, chat_teacher_dir, chat_file):
    out = tmp_path_factory.mktemp("generated") / "greedy"
    build(chat_teacher_dir, chat_file, out)
    return out


def stored_rows(cache) -> dict[int, tuple[list, list]]:
    reader = CacheReader(cache)
    group = reader.group
    return rows_by_prompt(group["input_ids"][:], group["target_mask"][:], group["document_ids"][:])


def teacher_answers(teacher_dir, data, *, seed=0, do_sample=False, conversations=None, **sampling):
    """What a user gets from the teacher's own generate: the same prompts (the conversations'
    prompts that fit), batched as the build batches them (BATCH rows from each unit's start)."""
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    if conversations is None:
        conversations = list(iter_conversations(str(data), split="all", messages_field="messages"))
    prompts = usable_prompts(conversation_prompts(tok, conversations), SEQ_LEN, MAX_NEW).ids
    stops = stop_token_ids(tok, model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    answers = {}
    for unit in range(0, len(prompts), SHARD):
        for b in range(unit, min(unit + SHARD, len(prompts)), BATCH):
            batch = prompts[b:min(b + BATCH, unit + SHARD, len(prompts))]
            got = reference_answers(model, batch, b, seed=seed, stop_ids=stops, pad_id=pad,
                                    max_new_tokens=MAX_NEW, do_sample=do_sample, **sampling)
            answers.update({b + r: (list(p), a) for r, (p, a) in enumerate(zip(batch, got))})
    return answers


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_the_cache_holds_the_teachers_own_generate_answers(tmp_path, chat_teacher_dir, chat_file,
                                                           greedy_cache, mode):
    if mode == "greedy":
        cache, expected = greedy_cache, teacher_answers(chat_teacher_dir, chat_file)
    else:
        cache = tmp_path / "sampled"
        build(chat_teacher_dir, chat_file, cache, **SAMPLED)
        expected = teacher_answers(chat_teacher_dir, chat_file, seed=5, do_sample=True,
                                   temperature=0.8, top_p=0.9)
    stored = stored_rows(cache)
    assert stored.keys() == expected.keys() and len(stored) > SHARD  # several units
    for i in expected:
        assert stored[i] == expected[i], f"row {i}"
    assert any(len(a) < MAX_NEW for _, a in stored.values())  # some answers stopped early


def test_sampled_answers_differ_from_greedy_and_with_the_seed(tmp_path, chat_teacher_dir, chat_file,
                                                             greedy_cache):
    a, b = tmp_path / "a", tmp_path / "b"
    build(chat_teacher_dir, chat_file, a, **SAMPLED)
    build(chat_teacher_dir, chat_file, b, **{**SAMPLED, "gen_seed": 6})
    greedy, first, second = stored_rows(greedy_cache), stored_rows(a), stored_rows(b)
    assert first != second and first != greedy
    assert CacheReader(a).manifest["fingerprint"] != CacheReader(b).manifest["fingerprint"]


def test_generate_logits_agree_with_the_cached_forward_and_settings_are_recorded(greedy_cache):
    manifest = CacheReader(greedy_cache).manifest
    check = manifest["build"]["generation"]
    assert check["max_abs_logp"] < 1e-3 and check["check_rows"] == 2
    assert check["answer_tokens_this_run"] == manifest["build"]["tokens"]["targets"]
    generation = manifest["settings"]["generation"]
    assert generation["do_sample"] is False and generation["max_new_tokens"] == MAX_NEW
    assert generation["batch_size"] == BATCH and generation["seed"] == 0
    assert generation["device_type"] == "cpu" and generation["eos_token_ids"]
    assert manifest["layout"]["packing"] == "none"


def test_a_stopped_build_resumes_to_the_same_cache(tmp_path, chat_teacher_dir, chat_file,
                                                   greedy_cache, monkeypatch):
    out = tmp_path / "stopped"
    calls = []
    real = generated_rows.TeacherGeneration.unit_rows

    def fail_on_the_second_unit(self, start, stop):
        calls.append(start)
        if len(calls) == 2:
            raise RuntimeError("stopped")
        return real(self, start, stop)

    monkeypatch.setattr(generated_rows.TeacherGeneration, "unit_rows", fail_on_the_second_unit)
    with pytest.raises(RuntimeError, match="stopped"):
        build(chat_teacher_dir, chat_file, out)
    monkeypatch.setattr(generated_rows.TeacherGeneration, "unit_rows", real)
    with pytest.raises(CacheMismatchError, match="seed"):
        build(chat_teacher_dir, chat_file, out, gen_seed=1)
    manifest = build(chat_teacher_dir, chat_file, out)
    units = -(-manifest["layout"]["n_sequences"] // SHARD)
    assert manifest["build"]["units_computed_this_run"] == units - 1
    assert_same_cache(out, greedy_cache)


@pytest.mark.parametrize("options, message", [
    (["--packing", "documents"], "--generate with --packing documents"),
    (["--gen-temperature", "0.5"], "greedy decoding"),
    (["--max-new-tokens", "200"], "leaves -104 of --seq-len 96"),
])
def test_bad_generation_options_are_refused_before_anything_is_written(tmp_path, chat_teacher_dir,
                                                                      chat_file, options, message):
    out = tmp_path / "refused"
    args = ["cache-build", "--teacher", str(chat_teacher_dir), "--data", str(chat_file), "--split",
            "all", "--messages-field", "messages", "--out", str(out), "--seq-len", str(SEQ_LEN),
            "--layers", "none", "--device", "cpu", "--quiet", "--generate",
            "--max-new-tokens", str(MAX_NEW), *options]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and message in result.output, result.output
    assert not out.exists()


def test_generation_options_need_generate_and_conversations(tmp_path, chat_teacher_dir, text_file):
    with pytest.raises(ConfigError, match="--gen-seed without --generate"):
        chat_build_config(chat_teacher_dir, text_file, tmp_path / "x", gen_seed=2)
    with pytest.raises(ConfigError, match="--generate with plain text"):
        chat_build_config(chat_teacher_dir, text_file, tmp_path / "x", messages_field=None,
                          generate=True)


def test_a_student_trains_on_a_generated_cache(tmp_path, greedy_cache, chat_student_dir):
    from unidistill.trainer.run import distill_from_cache

    trainer = distill_from_cache(str(greedy_cache), str(chat_student_dir),
                                 args_for(tmp_path / "run", max_steps=2, save_strategy="no"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(np.isfinite(losses)) and torch.isfinite(torch.tensor(losses)).all()


def test_cache_info_says_how_the_teacher_answered(greedy_cache):
    result = CliRunner().invoke(main, ["cache-info", str(greedy_cache)])
    assert result.exit_code == 0, result.output
    line = next(l for l in result.output.splitlines() if l.startswith("generation"))
    assert f"greedy, at most {MAX_NEW} new tokens, seed 0, batch {BATCH}" in line
    assert "dropped" in line and "max |delta log p|" in line


def test_prompts_from_a_plain_column_are_asked_as_one_user_message(tmp_path, chat_teacher_dir,
                                                                   conversations):
    """``--prompt-field``: each row's prompt is one user message; the cache holds the teacher's
    own answers to exactly that (and --messages-field or built-in text with it is refused)."""
    import json

    questions = [c[1]["content"] for c in conversations]  # each conversation's first user turn
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"question": q}) + "\n" for q in questions))
    out = tmp_path / "from-column"
    build(chat_teacher_dir, data, out, messages_field=None, prompt_field="question")
    expected = teacher_answers(chat_teacher_dir, data,
                               conversations=[[{"role": "user", "content": q}] for q in questions])
    assert stored_rows(out) == expected
    settings = CacheReader(out).manifest["settings"]["data"]
    assert settings["format"] == "prompts" and settings["prompt_field"] == "question"
    with pytest.raises(ConfigError, match="read as conversations"):
        generated_config(chat_teacher_dir, data, tmp_path / "x", prompt_field="question")
    with pytest.raises(ConfigError, match="built-in text has no columns"):
        generated_config(chat_teacher_dir, "builtin:pydoc_topics", tmp_path / "x",
                         messages_field=None, prompt_field="question")
    with pytest.raises(ConfigError, match="--prompt-field without --generate"):
        chat_build_config(chat_teacher_dir, data, tmp_path / "x", messages_field=None,
                          prompt_field="question")
