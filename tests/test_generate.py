"""``unidistill generate``: greedy continuations of one held-out prompt, side by side."""

from __future__ import annotations

import re

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


# --- conversations: --messages-field --------------------------------------------------------

CHAT_ROWS = [
    [{"role": "system", "content": "be brief"},
     {"role": "user", "content": "what does the cache store"},
     {"role": "assistant", "content": "teacher log probs"}],
    [{"role": "user", "content": "the students learn from"},
     {"role": "assistant", "content": "one build"},
     {"role": "user", "content": "and the layers"},
     {"role": "assistant", "content": "map and project"}],
    [{"role": "user", "content": "python function class"},
     {"role": "assistant", "content": "module import return value"}],
    [{"role": "user", "content": "alpha beta"},
     {"role": "assistant", "content": "gamma"},
     {"role": "user", "content": "temperature"},
     {"role": "tool", "content": "value"},
     {"role": "assistant", "content": "the whole team"}],
]


def _argmax_loop(model, prompt_ids, n):
    """Greedy decoding by hand: n forwards of the whole sequence, each taking the argmax."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=-1)
    return ids[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, documents):
    """The conftest BPE tokenizer with ChatML's tokens and template (end of turn <|im_end|>, an
    added token that is not special, so skip_special_tokens keeps it; EOS <eos>), and a random
    Llama whose lm_head rows of <|im_end|> and of the token it would write fourth after the first
    prompt are swapped, so that greedy decoding of that prompt stops after three tokens. Its saved
    generation config bans repeats, which greedy must ignore."""
    from .conftest import make_llama, make_tokenizer
    from .test_chat_render import CHATML
    from unidistill.text.chat import render_prompt

    tok = make_tokenizer(documents)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.add_tokens(["<|im_end|>"])  # an added token that is not special: decoding keeps it
    tok.chat_template = CHATML
    model = make_llama(len(tok), seed=3)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    free = _argmax_loop(model, render_prompt(tok, CHAT_ROWS[0]), 8)
    k = 3
    assert end not in free[:k + 1] and tok.eos_token_id not in free[:k + 1] and free[k] not in free[:k]
    with torch.no_grad():
        w = model.lm_head.weight
        w[[end, free[k]]] = w[[free[k], end]]
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.no_repeat_ngram_size = 1
    path = tmp_path_factory.mktemp("chat_model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    import json

    path = tmp_path_factory.mktemp("chat_data") / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": m, "n": i}) + "\n" for i, m in enumerate(CHAT_ROWS)))
    return path


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_stop_tokens_are_the_templates_end_of_turn_and_eos(chat_model_dir):
    from unidistill.generate import stop_token_ids

    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<eos>")]


def test_chat_answer_is_the_greedy_output_cut_at_the_stop_token(chat_model_dir):
    from unidistill.generate import answer_greedily, stop_token_ids
    from unidistill.text.chat import render_prompt

    model, tok = _load(chat_model_dir)
    stops = stop_token_ids(tok)
    prompt = render_prompt(tok, CHAT_ROWS[0])
    free = _argmax_loop(model, prompt, 10)
    assert free[3] == stops[0] and len(set(free[:3] + prompt)) < len(free[:3] + prompt)  # a repeat
    assert answer_greedily(model, tok, prompt, 10, stops) == (free[:4], True)
    assert answer_greedily(model, tok, prompt, 2, stops) == (free[:2], False)
    # transformers' own greedy search with the same stop ids, cut at the first of them
    out = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=stops,
                         repetition_penalty=1.0, no_repeat_ngram_size=0, pad_token_id=stops[1])
    assert out[0, len(prompt):].tolist()[:4] == free[:4]
    assert model.generation_config.no_repeat_ngram_size == 1  # the model's own config is put back


def test_chat_side_by_side_prompts_answers_and_references(chat_model_dir, student_dir, chat_file, monkeypatch):
    import unidistill.models.loading as loading
    from unidistill.generate import generate_side_by_side, stop_token_ids
    from unidistill.text.chat import render_prompt

    seen = []  # (model path, prompt ids) of every generate call
    real_load = loading.load_model

    def spying_load(source, dtype, device):
        model = real_load(source, dtype, device)
        real_generate = model.generate

        def generate(input_ids, **kw):
            seen.append((str(source.path), input_ids[0].tolist()))
            return real_generate(input_ids, **kw)

        model.generate = generate
        return model

    monkeypatch.setattr(loading, "load_model", spying_load)
    examples = generate_side_by_side({"chat": str(chat_model_dir), "other": str(chat_model_dir)},
                                     data=str(chat_file), split="all", messages_field="messages",
                                     n_prompts=3, max_new_tokens=6, device="cpu")
    model, tok = _load(chat_model_dir)
    stops = stop_token_ids(tok)
    assert [e.index for e in examples] == [0, 1, 2]
    assert [e.reference for e in examples] == ["teacher log probs", "map and project", "module import return value"]
    assert [e.question for e in examples] == ["what does the cache store", "and the layers", "python function class"]
    prompts = [render_prompt(tok, m) for m in CHAT_ROWS[:3]]
    assert seen == [(str(chat_model_dir), p) for p in prompts] * 2
    for e, prompt in zip(examples, prompts):
        free = _argmax_loop(model, prompt, 6)
        cut = next((t for t, x in enumerate(free) if x in stops), None)
        want = tok.decode(free[:cut] if cut is not None else free, skip_special_tokens=True)
        assert [(a.name, a.text, a.stopped, a.prompt_tokens) for a in e.answers] == \
            [(n, want, cut is not None, len(prompt)) for n in ("chat", "other")]
    assert examples[0].answers[0].stopped and examples[0].answers[0].new_tokens == 4


def test_chat_cli_shows_question_reference_and_each_answer(chat_model_dir, chat_file):
    from unidistill.generate import generate_side_by_side

    args = ["generate", "--model", f"a={chat_model_dir}", "--model", f"b={chat_model_dir}", "--data",
            str(chat_file), "--split", "all", "--messages-field", "messages", "--n-prompts", "9",
            "--max-new-tokens", "5", "--device", "cpu"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    examples = generate_side_by_side({"a": str(chat_model_dir)}, data=str(chat_file), split="all",
                                     messages_field="messages", n_prompts=4, max_new_tokens=5, device="cpu")
    blocks = res.stdout.split("\n\n")
    assert blocks[0] == "(the split holds 4 conversations; 9 were asked for)"
    assert blocks[1].splitlines()[:3] == ["conversation 0", "question: what does the cache store",
                                          "reference | teacher log probs"]
    assert blocks[4].splitlines()[:3] == ["conversation 3", "question: temperature", "reference | the whole team"]
    for block, e in zip(blocks[1:5], examples):
        a = e.answers[0]
        cut = "" if a.stopped else f" [cut at {a.new_tokens} tokens, no stop token]"
        assert block.splitlines()[3:] == [f"{n:<9} | {' '.join(a.text.split())}{cut}" for n in "ab"]
    assert "[cut at" not in blocks[1]  # the first prompt's answer stopped at <|im_end|>


def test_python_qa_reference_is_the_last_assistant_message(chat_model_dir):
    from itertools import islice

    from unidistill.text.data import iter_conversations

    res = CliRunner().invoke(main, ["generate", "--model", f"m={chat_model_dir}", "--data", "builtin:python_qa",
                                    "--messages-field", "messages", "--n-prompts", "2", "--max-new-tokens", "2",
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    convs = list(islice(iter_conversations("builtin:python_qa", split="heldout"), 2))
    refs = [line for line in res.stdout.splitlines() if line.startswith("reference | ")]
    assert refs == ["reference | " + " ".join(c[-1]["content"].split()) for c in convs]
    assert all(c[-1]["role"] == "assistant" for c in convs)


@pytest.mark.parametrize("extra, match", [
    (["--data", "builtin:python_qa"], "holds conversations.*Pass --messages-field messages"),
    (["--data", "builtin:pydoc_topics", "--messages-field", "messages"], "is plain text.*drop --messages-field"),
    (["--data", "builtin:python_qa", "--messages-field", "msgs"], "column 'messages'"),
    (["--data", "builtin:python_qa", "--messages-field", "messages", "--prompt", "hi"], "Drop --prompt"),
    (["--data", "builtin:python_qa", "--messages-field", "messages", "--prompt-tokens", "5"], "Drop --prompt-tokens"),
    (["--messages-field", "messages"], "needs --data"),
    (["--data", "builtin:pydoc_topics", "--n-prompts", "2"], "without --messages-field"),
    (["--data", "builtin:python_qa", "--messages-field", "messages", "--n-prompts", "0"], ">= 1"),
])
def test_mode_mismatches_are_refused_before_loading(extra, match):
    res = CliRunner().invoke(main, ["generate", "--model", "m=/no/such/model", *extra])
    assert res.exit_code == 2, res.output
    assert re.search(match, " ".join(res.output.split()), re.S), res.output


def test_conversation_file_without_messages_field_and_text_file_with_it(tiny_teacher_dir, chat_file, text_file):
    res = CliRunner().invoke(main, ["generate", "--model", str(tiny_teacher_dir), "--data", str(chat_file),
                                    "--split", "all"])
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and "'text' not found" in out and "pass --messages-field" in out
    assert "--text-field" not in out  # generate has no such option
    res = CliRunner().invoke(main, ["generate", "--model", str(tiny_teacher_dir), "--data", str(text_file),
                                    "--split", "all", "--messages-field", "messages"])
    assert res.exit_code == 2 and "messages field 'messages' not found" in res.output


def test_a_tokenizer_without_chat_template_is_refused(tiny_teacher_dir, chat_file):
    res = CliRunner().invoke(main, ["generate", "--model", str(tiny_teacher_dir), "--data", str(chat_file),
                                    "--split", "all", "--messages-field", "messages", "--device", "cpu"])
    assert res.exit_code == 2 and "has no chat template" in res.output
