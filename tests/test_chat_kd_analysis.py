"""The conversation-distillation experiment's analysis (benchmarks/chat_kd.py): the seed spread,
the verdict of each comparison against it, and the order in which runs need their caches."""

from __future__ import annotations

import pytest

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def chat_kd():
    return load_benchmark("chat_kd")


def metrics(ppl, top1, kl):
    return {"cache_perplexity": ppl, "top1_agreement": top1, "kl_to_teacher": kl}


def evaluations(chat_kd):
    """HR perplexities by hand: ce-ref 10 / 10.5 (seed 1), kd-ref 8 / 8.2, seqkd-kd 9 / 9.1."""
    ev = {}
    for label, ppl in [("ce-ref", 10.0), ("ce-ref.seed1", 10.5), ("kd-ref", 8.0),
                       ("kd-ref.seed1", 8.2), ("seqkd-kd", 9.0), ("seqkd-kd.seed1", 9.1),
                       ("mix", 7.9), ("seqkd-ce", 11.0)]:
        ev[label] = {"HR": metrics(ppl, 0.5, 1.0), "HG": metrics(ppl / 2, 0.6, 0.8)}
    return ev


def test_the_seed_spread_is_the_largest_repeat_difference(chat_kd):
    spread = chat_kd.seed_spread(evaluations(chat_kd))
    assert spread["per_run"]["ce-ref"]["HR"]["cache_perplexity"] == pytest.approx(0.5)
    assert spread["per_run"]["kd-ref"]["HR"]["cache_perplexity"] == pytest.approx(0.2)
    assert spread["max"]["HR"]["cache_perplexity"] == pytest.approx(0.5)
    assert spread["max"]["HG"]["cache_perplexity"] == pytest.approx(0.25)
    assert spread["max"]["HR"]["top1_agreement"] == 0.0


def test_a_difference_within_the_spread_is_no_measurable_difference(chat_kd):
    ev = evaluations(chat_kd)
    spread = chat_kd.seed_spread(ev)
    kd_vs_ce = chat_kd.compare(ev, "ce-ref", "kd-ref", "HR", "cache_perplexity", spread)
    assert kd_vs_ce["difference"] == pytest.approx(-2.0) and kd_vs_ce["clear"]  # 2.0 > 2 x 0.5
    mix = chat_kd.compare(ev, "kd-ref", "mix", "HR", "cache_perplexity", spread)
    assert mix["difference"] == pytest.approx(-0.1) and not mix["measurable"]
    between = chat_kd.compare(ev, "kd-ref", "seqkd-kd", "HR", "cache_perplexity", spread)
    assert between["measurable"] and not between["clear"]  # 1.0: over the spread, not over twice it
    assert chat_kd.readings(ev, spread)["mix_vs_kd_ref_on_HR_perplexity"] == mix


def test_runs_on_the_reference_cache_come_first_and_repeats_follow_their_recipe(chat_kd):
    order = chat_kd.run_order()
    first_generated = next(i for i, (name, _) in enumerate(order) if chat_kd.RUNS[name][2] != ["R"])
    assert all(chat_kd.RUNS[name][2] == ["R"] for name, _ in order[:first_generated])
    assert sorted(order) == sorted([(n, 0) for n in chat_kd.RUNS] + [(n, 1) for n in chat_kd.REPEATS])
    table = chat_kd.table_order()
    for name in chat_kd.REPEATS:
        assert table.index(name + chat_kd.SEED_SUFFIX) == table.index(name) + 1
