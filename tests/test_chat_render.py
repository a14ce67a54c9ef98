"""Chat rendering and the training mask, checked by hand on a tiny word-level tokenizer, and on
the real SmolLM2 tokenizer against a generation-marked copy of its template."""

from __future__ import annotations

import pytest

from unidistill.errors import DataError
from unidistill.text.chat import (
    EVERY_TOKEN,
    GENERATION_MARKERS,
    PREFIX_DIFF,
    PROBE_CONVERSATION,
    ChatTemplateError,
    parse_messages,
    render_conversation,
    render_prompt,
    template_probe,
)

VOCAB = ("<unk> <eos> <bos> <|im_start|> <|im_end|> system user assistant tool \n be brief what is "
         "two plus four and three six sum = 6").split(" ")
# SmolLM2's ChatML template without its default system prompt
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# the same text, assistant turns (content, end token and the newline) in generation blocks
CHATML_MARKED = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
                 "{% if message['role'] == 'assistant' %}{% generation %}"
                 "{{ message['content'] + '<|im_end|>' + '\n'}}{% endgeneration %}"
                 "{% else %}{{ message['content'] + '<|im_end|>' + '\n'}}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# rewrites earlier turns: an assistant message's content is rendered only when it is the last one
CHATML_REWRITING = CHATML.replace(
    "message['content']", "(message['content'] if message['role'] != 'assistant' or loop.last else '')")
# no end-of-turn token after an assistant turn
CHATML_UNTERMINATED = CHATML.replace(
    "message['content'] + '<|im_end|>'", "message['content'] + ('' if message['role'] == 'assistant' "
    "else '<|im_end|>')")

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what is two plus two"},
    {"role": "assistant", "content": "four"},
    {"role": "user", "content": "and three plus three"},
    {"role": "tool", "content": "sum = 6"},
    {"role": "assistant", "content": "six"},
]
# written out by hand: the rendering of CONVERSATION, one token per entry
TOKENS = ["<|im_start|>", "system", "\n", "be", "brief", "<|im_end|>", "\n",                    # 0-6
          "<|im_start|>", "user", "\n", "what", "is", "two", "plus", "two", "<|im_end|>", "\n",  # 7-16
          "<|im_start|>", "assistant", "\n", "four", "<|im_end|>", "\n",                          # 17-22
          "<|im_start|>", "user", "\n", "and", "three", "plus", "three", "<|im_end|>", "\n",     # 23-31
          "<|im_start|>", "tool", "\n", "sum", "=", "6", "<|im_end|>", "\n",                      # 32-39
          "<|im_start|>", "assistant", "\n", "six", "<|im_end|>", "\n"]                           # 40-45
TARGETS = [20, 21, 43, 44]  # four <|im_end|>, six <|im_end|>


def tiny_tokenizer(template: str | None = CHATML):
    """Word level: "\\n" is a token of its own, spaces separate words and are dropped."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                 pre_tokenizers.Split(" ", "removed")])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                      bos_token="<|im_start|>")
    wrapped.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    wrapped.chat_template = template
    return wrapped


def test_multi_turn_conversation_by_hand():
    tok = tiny_tokenizer()
    got = render_conversation(tok, CONVERSATION)
    assert tok.convert_ids_to_tokens(list(got.ids)) == TOKENS
    assert [t for t, on in enumerate(got.target) if on] == TARGETS
    assert got.turns == ((20, 22), (43, 45))
    assert got.mask_method == PREFIX_DIFF
    # the ids are exactly apply_chat_template's
    assert list(got.ids) == tok.apply_chat_template(CONVERSATION, return_dict=False)
    # the position-side loss mask of the design (loss at t predicts token t + 1): 19, 20, 42, 43
    assert [t for t in range(len(got.ids) - 1) if got.target[t + 1]] == [19, 20, 42, 43]


def test_a_conversation_that_opens_with_the_assistant_is_refused():
    """The prefix diff needs the rendering of the messages before the turn, and transformers
    refuses to render an empty conversation."""
    with pytest.raises(ChatTemplateError, match=r"cannot render the messages before message 0 "
                                                r"\(assistant\).*start the conversation with a system "
                                                r"or user message"):
        render_conversation(tiny_tokenizer(), CONVERSATION[2:4])
    # the markers path has no such limit
    got = render_conversation(tiny_tokenizer(CHATML_MARKED), CONVERSATION[2:4])
    assert [t for t, on in enumerate(got.target) if on] == [3, 4]  # four <|im_end|>, not the header


def test_train_on_all_targets_every_token_but_the_first():
    got = render_conversation(tiny_tokenizer(), CONVERSATION, train_on="all")
    assert len(got.ids) == len(TOKENS) and not got.target[0] and all(got.target[1:])
    assert got.mask_method == EVERY_TOKEN and got.turns == ()


def test_generation_markers_give_the_same_mask():
    plain, marked = tiny_tokenizer(), tiny_tokenizer(CHATML_MARKED)
    got = render_conversation(marked, CONVERSATION)
    assert got.mask_method == GENERATION_MARKERS
    want = render_conversation(plain, CONVERSATION)
    assert (got.ids, got.target, got.turns, got.text) == (want.ids, want.target, want.turns, want.text)
    assert [t for t, on in enumerate(got.target) if on] == TARGETS
    # transformers' own mask also covers the newline after <|im_end|>: the rstrip rule drops it
    raw = marked.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    assert [t for t, on in enumerate(raw["assistant_masks"]) if on] == [20, 21, 22, 43, 44, 45]


def test_a_template_that_rewrites_earlier_turns_is_refused_naming_the_message():
    with pytest.raises(ChatTemplateError, match=r"not prefix-stable at message 2 \(assistant\).*"
                                                r"\{% generation %\} markers.*--train-on all"):
        render_conversation(tiny_tokenizer(CHATML_REWRITING), CONVERSATION)
    # the same template is fine on a single-turn conversation, and with --train-on all
    assert render_conversation(tiny_tokenizer(CHATML_REWRITING), CONVERSATION[:3]).turns == ((20, 22),)
    render_conversation(tiny_tokenizer(CHATML_REWRITING), CONVERSATION, train_on="all")


def test_an_assistant_turn_without_an_end_token_is_refused():
    with pytest.raises(ChatTemplateError, match=r"assistant message 2 ends in token 'four'.*not an added "
                                                r"or special token.*never learn to stop"):
        render_conversation(tiny_tokenizer(CHATML_UNTERMINATED), CONVERSATION)
    marked = CHATML_MARKED.replace("message['content'] + '<|im_end|>' + '\n'}}{% endgeneration %}",
                                   "message['content']}}{% endgeneration %}{{'<|im_end|>\n'}}")
    with pytest.raises(ChatTemplateError, match="assistant message 2 ends in token 'four'"):
        render_conversation(tiny_tokenizer(marked), CONVERSATION)


@pytest.mark.parametrize("template", [CHATML, CHATML_MARKED])
def test_an_empty_assistant_turn_is_refused(template):
    empty = [*CONVERSATION[:5], {"role": "assistant", "content": ""}]
    render_conversation(tiny_tokenizer(template), empty)  # "" + <|im_end|>: the stop token is trained
    blank_marked = CHATML_MARKED.replace("message['content'] + '<|im_end|>' + '\n'}}{% endgeneration %}",
                                         "message['content']}}{% endgeneration %}{{'<|im_end|>\n'}}")
    with pytest.raises(ChatTemplateError, match=r"1 runs of target tokens for 2 assistant messages "
                                                r"\(indices \[2, 5\]\)"):
        render_conversation(tiny_tokenizer(blank_marked), empty)


def test_no_assistant_message_no_template_and_slow_tokenizers_are_refused():
    with pytest.raises(ChatTemplateError, match=r"no assistant message.*--train-on all"):
        render_conversation(tiny_tokenizer(), CONVERSATION[:2])
    with pytest.raises(ChatTemplateError, match="has no chat template.*set tokenizer.chat_template"):
        render_conversation(tiny_tokenizer(None), CONVERSATION)

    class Slow:
        chat_template, is_fast = CHATML, False

    with pytest.raises(ChatTemplateError, match=r"slow \(Python\) tokenizer.*use_fast=True"):
        render_conversation(Slow(), CONVERSATION)
    with pytest.raises(DataError, match=r"train_on is 'prompt'; expected one of \('assistant', 'all'\)"):
        render_conversation(tiny_tokenizer(), CONVERSATION, train_on="prompt")


def test_parse_messages_checks_roles_and_content():
    assert parse_messages(CONVERSATION, "row 0") == CONVERSATION
    assert parse_messages([{"role": "ipython", "content": "x"}], "row 0") == [{"role": "ipython", "content": "x"}]
    where = "row 3, field 'messages' of data.jsonl"
    with pytest.raises(DataError, match=rf"{where} holds str 'hi'; expected a non-empty list"):
        parse_messages("hi", where)
    with pytest.raises(DataError, match=r"message 1 of row 3.*role 'bot'; expected one of \('system'"):
        parse_messages([CONVERSATION[0], {"role": "bot", "content": "x"}], where)
    with pytest.raises(DataError, match=r"message 0 of row 3.*\['content', 'name', 'role'\].*exactly"):
        parse_messages([{"role": "user", "content": "x", "name": "a"}], where)
    with pytest.raises(DataError, match=r"message 0 of row 3.*has \['role'\]; expected a dict"):
        parse_messages([{"role": "user", "content": None}], where)
    # keys that a data set's columns add as None are not the message's
    assert parse_messages([{"role": "user", "content": "x", "tool_calls": None}], where) == [
        {"role": "user", "content": "x"}]
    with pytest.raises(DataError, match="message 0 of row 3.*content of type list; expected a string"):
        parse_messages([{"role": "user", "content": [{"type": "text", "text": "x"}]}], where)


def test_render_prompt_is_a_token_prefix_of_the_answered_conversation():
    tok = tiny_tokenizer()
    ids = list(render_conversation(tok, CONVERSATION).ids)
    # everything before the last assistant message (the tool turn included), then its header
    assert render_prompt(tok, CONVERSATION) == ids[:43]
    assert render_prompt(tok, CONVERSATION[:2]) == ids[:20]  # no answer yet
    with pytest.raises(DataError, match="starts with its only assistant message"):
        render_prompt(tok, CONVERSATION[2:3])


def test_template_probe_compares_what_templates_produce():
    plain = template_probe(tiny_tokenizer())
    assert plain == tiny_tokenizer().apply_chat_template(list(PROBE_CONVERSATION), return_dict=False)
    assert template_probe(tiny_tokenizer(CHATML_MARKED)) == plain  # markers change no text
    assert template_probe(tiny_tokenizer(CHATML.replace("'\n' + message['content']", "' ' + message['content']"))) != plain


SMOLLM2_TURN = ("{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}")
SMOLLM2_TURN_MARKED = ("{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}"
                       "{% generation %}{{ message['content'] + '<|im_end|>' + '\n'}}{% endgeneration %}"
                       "{% else %}{{ message['content'] + '<|im_end|>' + '\n'}}{% endif %}")


def test_smollm2_prefix_diff_equals_its_template_with_generation_markers():
    from unidistill.models.loading import load_tokenizer, resolve_model_source

    tok = load_tokenizer(resolve_model_source("builtin:smollm2"))
    conversation = [{"role": "system", "content": "You answer briefly."},
                    {"role": "user", "content": "What is 2 + 2?"},
                    {"role": "assistant", "content": "4."},
                    {"role": "user", "content": "And 3 + 3?"},
                    {"role": "assistant", "content": "6."}]
    plain = render_conversation(tok, conversation)
    assert plain.mask_method == PREFIX_DIFF
    assert [tok.convert_ids_to_tokens(list(plain.ids[a:b])) for a, b in plain.turns] == [
        ["4", ".", "<|im_end|>"], ["6", ".", "<|im_end|>"]]
    assert SMOLLM2_TURN in tok.chat_template
    tok.chat_template = tok.chat_template.replace(SMOLLM2_TURN, SMOLLM2_TURN_MARKED)
    marked = render_conversation(tok, conversation)
    assert marked.mask_method == GENERATION_MARKERS
    assert (marked.ids, marked.target, marked.turns) == (plain.ids, plain.target, plain.turns)
    # without a system message the template injects its default one: context, never a target
    default = render_conversation(tok, conversation[1:])
    assert default.text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert sum(default.target) == sum(plain.target) == 6
