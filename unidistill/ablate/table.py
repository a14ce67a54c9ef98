"""The ablation's table: each run's numbers next to the teacher's and the untrained student's,
``ablation.json`` and its markdown rendering ``ablation.md``."""

from __future__ import annotations

import math

from unidistill.ablate.heldout import HeldOut, eval_file
from unidistill.ablate.variants import ONLINE, SHOWN

ABLATION_JSON, ABLATION_MD = "ablation.json", "ablation.md"
METRICS = ("perplexity", "nll", "perplexity_ratio", "accuracy", "accuracy_ratio", "recovery_pct",
           "top1_agreement", "kl_to_teacher")
HELDOUT_SETS = "heldout_sets"  # in each row of ablation.json: every held-out set's metrics by name


def recovery(nll_run: float | None, nll_student: float | None, nll_teacher: float | None) -> float | None:
    """Share (%) of the student-teacher gap in log-perplexity (mean NLL) that the run closes."""
    if None in (nll_run, nll_student, nll_teacher) or nll_student == nll_teacher:
        return None
    return 100.0 * (nll_student - nll_run) / (nll_student - nll_teacher)


def ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference (e.g. a run's perplexity / the teacher's), None where undefined."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def _metrics(ev: dict, ref: dict) -> dict:
    """A model's numbers on one held-out set, next to the teacher's and the untrained student's."""
    return {"perplexity": ev.get("perplexity"), "nll": ev.get("nll"),
            "perplexity_ratio": ratio(ev.get("perplexity"), ref["teacher"].get("perplexity")),
            "accuracy": ev.get("accuracy"),
            "accuracy_ratio": ratio(ev.get("accuracy"), ref["teacher"].get("accuracy")),
            "recovery_pct": recovery(ev.get("nll"), ref["student"].get("nll"), ref["teacher"].get("nll")),
            "top1_agreement": ev.get("top1_agreement"), "kl_to_teacher": ev.get("kl_to_teacher")}


def row(name: str, settings: dict, evs: dict[str, dict], refs: dict[str, dict], tokens_per_s) -> dict:
    """One row: the first held-out set's metrics at the top level, every set's by name."""
    per_set = {set_name: _metrics(ev, refs[set_name]) for set_name, ev in evs.items()}
    first = next(iter(per_set.values()))
    return {"name": name, "settings": settings, **first, HELDOUT_SETS: per_set,
            "tokens_per_s": tokens_per_s}


def new_table(cache, fingerprint, teacher: str, student: str, sets: list[HeldOut],
               heldout_fingerprints: dict, eval_sequences, common: dict, refs: dict) -> dict:
    """``ablation.json`` before its rows: what the runs trained on and were evaluated on."""
    first, first_ref = sets[0], refs[sets[0].name]
    # one cache: its path and fingerprint; several (every run's, unless it names its own): lists
    return {"cache": [str(c) for c in cache] if isinstance(cache, list) else str(cache),
            "cache_fingerprint": fingerprint, "teacher": teacher, "student": student,
            "heldout": first.data, "heldout_split": first.split, "heldout_cache": first.cache,
            "heldout_cache_fingerprint": heldout_fingerprints[first.name],
            "heldouts": [{"name": h.name, "data": h.data, "split": h.split, "cache": h.cache,
                          "cache_fingerprint": heldout_fingerprints[h.name],
                          "eval_file": eval_file(i, h)} for i, h in enumerate(sets)],
            "eval_sequences": eval_sequences,
            "vocab_size": first_ref["teacher"].get("vocab_size"),
            "uniform_nll": first_ref["teacher"].get("uniform_nll"),
            "common": common}


def uniform_baseline_note(table: dict) -> str | None:
    """One sentence on the uniform guess ln V, and whether the untrained student is worse than it."""
    uniform = table.get("uniform_nll")
    if uniform is None:
        return None
    note = (f"Uniform guess over the V = {table.get('vocab_size')} ids: log-perplexity ln V = "
            f"{uniform:.2f} (perplexity {math.exp(uniform):,.0f}).")
    student = next((r for r in table["rows"] if r["name"] == "student (before)"), None)
    if student is not None and student.get("nll") is not None and student["nll"] > uniform:
        note += (f" The untrained student ({student['nll']:.2f}) is worse than that guess: much of "
                 "its gap is closed by learning token frequencies, so the gap-closed % flatters; "
                 "read the ratios to the teacher.")
    return note


_COLUMNS = (("perplexity", "perplexity"), ("perplexity ÷ teacher", "perplexity_ratio"),
            ("next-token accuracy", "accuracy"), ("accuracy ÷ teacher", "accuracy_ratio"),
            ("log-ppl gap closed %", "recovery_pct"), ("top-1 agreement", "top1_agreement"),
            ("KL to teacher", "kl_to_teacher"))


def _cells(m: dict) -> list[str]:
    from unidistill.evaluate import format_number as num

    kl = m.get("kl_to_teacher")
    return [num(m.get("perplexity"), ".3f"), format_ratio(m.get("perplexity_ratio")),
            num(m.get("accuracy"), ".3f"), format_ratio(m.get("accuracy_ratio")),
            num(_no_negative_zero(m.get("recovery_pct")), ".1f"), num(m.get("top1_agreement"), ".3f"),
            num(_no_negative_zero(kl, 5e-5), ".4f")]


def table_heldout_names(table: dict) -> list[str]:
    """The names of an ablation's held-out sets, in order ([] for a table of one set written
    before there could be several)."""
    return [h["name"] for h in table.get("heldouts") or []]


def format_table(table: dict) -> str:
    """The markdown table of an ablation (``ablation.json``; keys an older version did not write
    show as -). Several held-out sets: one block of columns per set, headed ``name: column``."""
    from unidistill.evaluate import format_number as num

    names = table_heldout_names(table)
    several = len(names) > 1
    if several:
        where = "; ".join(f"{h['name']} = `{h['data']}` ({h.get('split') or 'default split'})"
                          for h in table["heldouts"])
    else:
        where = f"`{table['heldout']}`"
    caches = table["cache"] if isinstance(table["cache"], list) else [table["cache"]]
    lines = [f"# Ablation from cache{'s' * (len(caches) > 1)} " + ", ".join(f"`{c}`" for c in caches), "",
             f"Teacher `{table['teacher']}`, student `{table['student']}`, held-out {where}.",
             "Perplexity and accuracy ÷ teacher: the run's value over the teacher's. Next-token "
             "accuracy: share of positions whose most likely token is the actual next one. "
             "Log-ppl gap closed % (recovery): share of the untrained student's gap to the teacher "
             "in log-perplexity that the run closes."]
    note = uniform_baseline_note(table)
    lines += [note] if note else []
    blocks = names if several else [None]
    header = ["run", "settings"] + [f"{n}: {c}" if n else c for n in blocks for c, _ in _COLUMNS] + ["tokens/s"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table["rows"]:
        order = SHOWN + (ONLINE,)  # ablation.json stores keys sorted: show them in this order
        shown = sorted(r["settings"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
        settings = ", ".join(f"{k}={v}" for k, v in shown)
        metrics = [(r.get(HELDOUT_SETS) or {}).get(n, {}) if n else r for n in blocks]
        cells = [r["name"], settings] + [c for m in metrics for c in _cells(m)] + [
            num(r.get("tokens_per_s"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_ratio(x: float | None) -> str:
    """A ratio to the teacher: two decimals, or three significant digits from 1000 up."""
    return "-" if x is None else format(x, ".2f" if abs(x) < 1000 else ".3g")


def _no_negative_zero(x, below: float = 0.05):
    """``x``, or 0.0 where it would print as -0.0 (|x| under half the last digit shown); a real
    negative value, such as a sampled cache's unbiased KL estimate, is shown as it is."""
    return None if x is None else (0.0 if abs(x) < below else x)
