"""The generation core of ``cache-build --generate`` (cache_builder/generation.py): the rows it
makes hold the teacher's own ``model.generate`` answers for the same seed, greedy and sampled,
in left-padded batches of prompts of different lengths; the masks and document ids by hand; the
consistency check of generate's raw logits against a forward; refusals of bad settings.

The rows are read back through :func:`rows_by_prompt`, which takes the three arrays a generated
cache stores; once ``--generate`` writes caches, the same comparisons can read the cache's arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unidistill.cache_builder.generation import (
    PAD_DOCUMENT,
    DecodingSettings,
    conversation_prompts,
    cut_answer,
    generate_unit,
    max_logp_gap,
    stop_token_ids,
    unit_rows,
    usable_prompts,
)
from unidistill.errors import ConfigError, DataError

from .conftest import make_llama
from .test_chat_render import CONVERSATION, TOKENS, tiny_tokenizer

SEQ_LEN = 64
MAX_NEW = 8
GREEDY = dict(max_new_tokens=MAX_NEW, batch_size=2)
SAMPLED = dict(max_new_tokens=MAX_NEW, batch_size=2, do_sample=True, temperature=0.8, top_p=0.9, seed=3)
# prompts of different lengths (43, 20, 9, 18, 8 tokens), so batches are left-padded
CONVERSATIONS = [
    CONVERSATION,
    CONVERSATION[:3],
    [{"role": "user", "content": "six"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "two plus four"}],
    [{"role": "user", "content": ""}],
]
UNITS = [(0, 3), (3, 5)]  # two units, the second starting inside a batch of the first's grid


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    """The tiny random Llama over the chat tokenizer's 23 ids, its head scaled so that the
    next-token distributions are less flat; with this seed some answers end at a stop id and some
    run to MAX_NEW, greedy and sampled. eos: the tokenizer's <|im_end|> (4) and the model's 1."""
    m = make_llama(len(tok), seed=1)
    with torch.no_grad():
        m.lm_head.weight.mul_(3.0)
    return m


@pytest.fixture(scope="module")
def prompts(tok):
    return usable_prompts(conversation_prompts(tok, CONVERSATIONS), SEQ_LEN, MAX_NEW)


def reference_answers(model, prompts, first_index: int, *, seed: int, stop_ids, pad_id: int,
                      max_new_tokens: int, do_sample: bool = False, **sampling) -> list[list[int]]:
    """The teacher's own generate on one left-padded batch, written as a user would call it
    (keyword arguments, top_k=0 spelled out for sampling), each answer cut after its first stop."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed * 1_000_003 + first_index)
    extra = dict(top_k=0, **sampling) if do_sample else {}
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                         eos_token_id=list(stop_ids), pad_token_id=pad_id, **extra)
    answers = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        answers.append(row[:cut])
    return answers


def rows_by_prompt(ids: np.ndarray, target: np.ndarray, docs: np.ndarray) -> dict[int, tuple[list, list]]:
    """{prompt index: (prompt ids, answer ids)} from the stored arrays of a generated cache
    (``train_on="assistant"``): a row's tokens are those of its document id, the answer its
    targets, and padding is everything after them."""
    out = {}
    for row_ids, row_target, row_docs in zip(ids, target, docs):
        real = row_docs != PAD_DOCUMENT
        n = int(real.sum())
        assert real[:n].all() and len(set(row_docs[real].tolist())) == 1, "one document, then padding"
        answer = row_target[:n].astype(bool)
        first = int(np.argmax(answer)) if answer.any() else n
        assert answer[first:].all() and not answer[:first].any(), "the targets are one run at the end"
        assert not row_target[n:].any()
        out[int(row_docs[0])] = (row_ids[:first].tolist(), row_ids[first:n].tolist())
    return out


def expected_rows(model, tok, prompts, settings: DecodingSettings) -> dict[int, tuple[list, list]]:
    """Each prompt with the reference answer of its batch (batches of batch_size from each
    unit's start, seeded by the batch's first prompt index)."""
    stops, pad = stop_token_ids(tok, model), settings.to_dict(tok, model)["pad_token_id"]
    sampling = dict(temperature=settings.temperature, top_p=settings.top_p) if settings.do_sample else {}
    out = {}
    for start, end in UNITS:
        for b in range(start, end, settings.batch_size):
            batch = [list(p) for p in prompts.ids[b:min(b + settings.batch_size, end)]]
            answers = reference_answers(model, batch, b, seed=settings.seed, stop_ids=stops, pad_id=pad,
                                        max_new_tokens=settings.max_new_tokens,
                                        do_sample=settings.do_sample, **sampling)
            out.update({b + r: (p, a) for r, (p, a) in enumerate(zip(batch, answers))})
    return out


def generate_all(model, tok, prompts, settings: DecodingSettings, **kw):
    config = settings.generation_config(tok, model)
    return [generate_unit(model, prompts, start, end, settings, config, seq_len=SEQ_LEN, **kw)
            for start, end in UNITS]


def test_prompt_from_conversation_by_hand(tok, prompts):
    # the conversation up to its last assistant message, then the generation prompt
    assert tok.convert_ids_to_tokens(list(prompts.ids[0])) == TOKENS[:43]
    assert tok.convert_ids_to_tokens(list(prompts.ids[1])) == TOKENS[:20]
    assert [len(p) for p in prompts.ids] == [43, 20, 9, 18, 8]
    assert prompts.source_index == (0, 1, 2, 3, 4) and prompts.dropped == 0


def test_long_prompts_are_dropped_before_units_are_formed():
    got = usable_prompts([[1] * 5, [1] * 7, [1] * 6, [1]], seq_len=10, max_new_tokens=4)
    assert got.ids == ((1,) * 5, (1,) * 6, (1,)) and got.source_index == (0, 2, 3) and got.dropped == 1
    with pytest.raises(DataError, match="none of the 2 prompts fits.*at most 6 tokens"):
        usable_prompts([[1] * 7, [1] * 8], seq_len=10, max_new_tokens=4)
    with pytest.raises(DataError, match="prompt 1 has no tokens"):
        usable_prompts([[1], []], seq_len=10, max_new_tokens=4)
    with pytest.raises(ConfigError, match="expected seq_len > max_new_tokens"):
        usable_prompts([[1]], seq_len=8, max_new_tokens=8)


def test_rows_by_hand():
    prompts, answers = [[5, 6, 7], [8, 9]], [[10, 4], [11, 12, 13]]
    ids, target, docs = unit_rows(prompts, answers, start=4, seq_len=7, pad_id=0)
    assert ids.dtype == np.int32 and target.dtype == np.uint8 and docs.dtype == np.int32
    assert ids.tolist() == [[5, 6, 7, 10, 4, 0, 0], [8, 9, 11, 12, 13, 0, 0]]
    assert target.tolist() == [[0, 0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0, 0]]
    assert docs.tolist() == [[4, 4, 4, 4, 4, -2, -2], [5, 5, 5, 5, 5, -2, -2]]
    _, target_all, docs_all = unit_rows(prompts, answers, start=4, seq_len=7, pad_id=0, train_on="all")
    assert target_all.tolist() == [[0, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0, 0]]
    assert (docs_all == docs).all()
    assert cut_answer([3, 4, 5, 4], [4]) == ([3, 4], True)
    assert cut_answer([3, 5], (4, 1)) == ([3, 5], False)


@pytest.mark.parametrize("kind", ["greedy", "sampled"])
def test_rows_hold_the_teachers_own_generate_output(model, tok, prompts, kind):
    """The issue's must-show: the rows' answers equal model.generate's for the same seed, in
    left-padded batches of several prompts of different lengths, over two units."""
    settings = DecodingSettings(**(GREEDY if kind == "greedy" else SAMPLED))
    units = generate_all(model, tok, prompts, settings)
    got = {}
    for unit in units:
        got.update(rows_by_prompt(unit.input_ids, unit.target, unit.document_ids))
    want = expected_rows(model, tok, prompts, settings)
    assert got == want
    stops = stop_token_ids(tok, model)
    answers = [a for _, a in want.values()]
    finished = [a[-1] in stops for a in answers]
    assert all(f or len(a) == MAX_NEW for f, a in zip(finished, answers))
    assert sum(u.stats["unfinished"] for u in units) == finished.count(False)
    assert sum(u.stats["answer_tokens"] for u in units) == sum(map(len, answers))
    assert sum(u.stats["rows"] for u in units) == len(prompts.ids)
    for unit in units:
        assert unit.stats["targets"] == int(unit.target.sum())
        assert unit.stats["padding"] == int((unit.document_ids == PAD_DOCUMENT).sum())
    # with this fixture both kinds have rows that ended at a stop id and rows cut at MAX_NEW
    assert any(finished) and not all(finished)


def test_answers_end_at_the_models_stop_ids_too(model, tok, prompts):
    """The stop ids are the tokenizer's eos and the model's generation_config eos ids: a token the
    greedy answers hold, made a stop id of the model, cuts them after its first occurrence."""
    settings = DecodingSettings(**GREEDY)
    before = {i: a for u in generate_all(model, tok, prompts, settings)
              for i, (_, a) in rows_by_prompt(u.input_ids, u.target, u.document_ids).items()}
    longest = max(before, key=lambda i: len(before[i]))
    stop = before[longest][1]
    assert stop not in before[longest][:1] and len(before[longest]) > 2
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [stop]
    try:
        assert settings.to_dict(tok, model)["eos_token_ids"] == [tok.eos_token_id, stop]
        after = {i: a for u in generate_all(model, tok, prompts, settings)
                 for i, (_, a) in rows_by_prompt(u.input_ids, u.target, u.document_ids).items()}
    finally:
        model.generation_config.eos_token_id = saved
    assert after == {i: cut_answer(a, [tok.eos_token_id, stop])[0] for i, a in before.items()}
    assert len(after[longest]) == 2


def test_same_seed_same_tokens_other_seed_other_samples(model, tok, prompts):
    def tokens(**kw):
        return [u.input_ids for u in generate_all(model, tok, prompts, DecodingSettings(**kw))]

    sampled = tokens(**SAMPLED)
    assert all((a == b).all() for a, b in zip(sampled, tokens(**SAMPLED)))
    other = tokens(**{**SAMPLED, "seed": 4})
    assert any((a != b).any() for a, b in zip(sampled, other))
    # greedy decoding draws nothing: the seed changes no token
    greedy = tokens(**GREEDY)
    assert all((a == b).all() for a, b in zip(greedy, tokens(**{**GREEDY, "seed": 9})))


def test_consistency_check_of_generate_logits_against_a_forward(model, tok, prompts):
    """Design 2.6: generate's raw logits at the answer positions equal the log-probs of a plain
    forward over the stored rows (right-padded) to < 1e-3 in fp32 (greedy), over the whole
    vocabulary and over a top-k cache's ids; the comparison fails when the positions are off."""
    settings = DecodingSettings(**GREEDY)
    unit = generate_all(model, tok, prompts, settings, check=True)[0]
    check = unit.check
    assert check is not None and check.first_index == 0 and all(b.raw_logits is None for b in unit.batches[1:])
    rows = torch.as_tensor(unit.input_ids[:len(check.answers)], dtype=torch.long)
    with torch.no_grad():
        logp = torch.log_softmax(model(rows).logits.float(), dim=-1)     # (B, L, V)
    lengths = [len(a) for a in check.answers]
    assert min(lengths) >= 2
    gap = max_logp_gap(check.raw_logits, check.prompt_lengths, lengths, logp)
    assert gap < 1e-3
    top, ids = logp.topk(5, dim=-1)
    assert max_logp_gap(check.raw_logits, check.prompt_lengths, lengths, top, ids) < 1e-3
    shifted = torch.roll(logp, 1, dims=1)
    assert max_logp_gap(check.raw_logits, check.prompt_lengths, lengths, shifted) > 0.1


def test_generation_config_is_explicit(model, tok):
    """What generate will decode with (its own merge of the config with the model's and the global
    defaults) is what the settings say: top_k 0, not transformers' unset default 50."""
    from transformers import GenerationConfig

    settings = DecodingSettings(**SAMPLED)
    config = settings.generation_config(tok, model)
    used, _ = model._prepare_generation_config(config)
    assert (used.do_sample, used.temperature, used.top_p, used.top_k, used.repetition_penalty) == \
        (True, 0.8, 0.9, 0, 1.0)
    assert (used.max_new_tokens, used.num_beams, used.eos_token_id, used.pad_token_id) == \
        (MAX_NEW, 1, [4, 1], 4)
    assert model._prepare_generation_config(GenerationConfig(do_sample=True))[0].top_k == 50
    import transformers

    assert settings.to_dict(tok, model) == {
        "max_new_tokens": MAX_NEW, "do_sample": True, "temperature": 0.8, "top_p": 0.9, "top_k": 0,
        "repetition_penalty": 1.0, "seed": 3, "batch_size": 2, "eos_token_ids": [4, 1],
        "pad_token_id": 4, "transformers_version": transformers.__version__}


@pytest.mark.parametrize("kw, match", [
    (dict(max_new_tokens=0), r"max_new_tokens \(--max-new-tokens\) is 0; expected an integer >= 1"),
    (dict(max_new_tokens=True), r"max_new_tokens \(--max-new-tokens\) is True"),
    (dict(do_sample="yes"), r"do_sample \(--sample\) is 'yes'"),
    (dict(do_sample=True, temperature=0.0), r"temperature \(--gen-temperature\) is 0.0; expected a finite number > 0"),
    (dict(do_sample=True, temperature=float("nan")), r"temperature .* is nan"),
    (dict(do_sample=True, top_p=0.0), r"top_p \(--gen-top-p\) is 0.0; expected a finite number in \(0, 1\]"),
    (dict(do_sample=True, top_p=1.5), r"top_p .* is 1.5"),
    (dict(do_sample=True, top_k=-1), r"top_k \(--gen-top-k\) is -1; expected an integer >= 0 \(0 = off\)"),
    (dict(repetition_penalty=0), r"repetition_penalty \(--gen-repetition-penalty\) is 0"),
    (dict(seed=-1), r"seed \(--gen-seed\) is -1; expected an integer >= 0"),
    (dict(seed=2 ** 32), r"seed \(--gen-seed\) is 4294967296; expected at most 4294967295"),
    (dict(batch_size=0), r"batch_size \(--batch-size\) is 0"),
    (dict(temperature=0.7, top_k=5), r"greedy decoding \(no --sample\) with temperature 0.7 "
                                     r"\(--gen-temperature\), top_k 5 \(--gen-top-k\).*pass --sample"),
])
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        DecodingSettings(**kw)


def test_models_that_would_change_decoding_unseen_are_refused(model, tok):
    settings = DecodingSettings(**GREEDY)
    saved = model.generation_config.suppress_tokens
    model.generation_config.suppress_tokens = [5]
    try:
        with pytest.raises(ConfigError, match=r"generation_config sets suppress_tokens=\[5\].*remove"):
            settings.generation_config(tok, model)
    finally:
        model.generation_config.suppress_tokens = saved
    saved = tok.eos_token, model.generation_config.eos_token_id
    tok.eos_token, model.generation_config.eos_token_id = None, None
    try:
        with pytest.raises(ConfigError, match="has an eos token id"):
            settings.generation_config(tok, model)
    finally:
        tok.eos_token, model.generation_config.eos_token_id = saved
