"""``unidistill ablate``: several distillation runs from ONE cache, each evaluated, in one table.

The runs differ only in what the user lists (loss weights, layer map, hidden loss, temperature,
k, ...); everything else comes from ``common``. The teacher and the untrained student are
evaluated on the same held-out text, and each run is put next to them three ways:

- **perplexity ÷ teacher** (1 = the teacher's perplexity);
- **next-token accuracy** (share of positions whose argmax is the actual next token) and
  **accuracy ÷ teacher**: the analogue of "% of the teacher's benchmark score";
- **log-perplexity gap closed %** (``recovery_pct``):

      100 * (nll_student - nll_run) / (nll_student - nll_teacher)

  the share of the untrained student's gap to the teacher in log-perplexity that the run closes.
  It flatters a student that starts worse than a uniform guess over the vocabulary (log-perplexity
  above ln V, which the table reports): most of such a gap is closed by learning token
  frequencies. Read it with the two ratios.

**What is kept on a rerun, and when it is redone.** Each piece records what produced it:
``<run>/ablate_run.json`` the run's training settings (every distill argument, defaults filled
in, bookkeeping such as logging and saving left out; ``online``; the training cache's
fingerprint, or the ``cache_fingerprints`` of a run on several caches in training order; the
student's files), and every ``eval.json`` (``_teacher/``, ``_student/``, each
run's) under ``produced_by`` the evaluation's settings (the model's files, ``--heldout`` and its
split, the held-out file's content, the ``--heldout-cache`` fingerprint, ``--eval-sequences``,
the metrics version). Rerunning the command keeps every piece whose record matches and redoes
the others, saying why in the log:

- an evaluation whose settings changed is simply redone (its model is still there);
- a run whose training settings changed (or that an older version made without a record) is
  trained again from scratch (a distill argument added since the run was recorded counts as
  unchanged while it is at its default, which keeps the old behaviour), and its old folder -- a
  trained model the user may want -- is **moved**, never deleted, to ``_replaced/<run>-<time>/``
  (delete it when it is not wanted);
- a run stopped mid-way with the same settings continues from its last checkpoint; its
  checkpoints are never resumed under other settings.

Files are identified by content (files above 64 MiB by size, modification time and first and
last MiB; see :func:`unidistill.fingerprint.file_digest`); a hub id by its name only (pin a
revision by downloading it). The evaluation's batch size and device are not recorded: they do not
change the numbers beyond rounding. ``ablation.json`` and ``ablation.md`` are rewritten after every run.

**Several held-out sets.** ``heldout`` (with ``heldout_split`` and ``heldout_cache``) may be a
list: every model is then evaluated on each set, e.g. the training domain's held-out split and text
of another kind. Each set has a name (its source without ``builtin:`` or its file stem, or the one
given); the first set's evaluation is ``eval.json``, the others' ``eval.<name>.json``, each with
its own ``produced_by``. Every row of ``ablation.json`` keeps the first set's numbers at its top
level (as with one set) and holds every set's under ``heldout_sets[name]``; the markdown table gets
one block of columns per set. Each set is refused, like a single one, when it shares documents
with the training cache.

**Several caches.** ``cache`` may be a list (every run trains on the caches concatenated, in
that order), and a variant may name its own ``cache`` (one path or a list), e.g. a "mix" run
beside runs on one cache each; another list or another order retrains that run, and held-out
text is checked against every cache a run trains on.

A run may also be the **online baseline**: ``online: full`` (or ``online: K``) loads the teacher
and trains on the same cached token ids with targets from the live teacher (all V ids, or its
top-K), which measures what the cache's top-k + tail costs on the same token budget.

Modules: :mod:`.variants` (the runs, their checks and arguments), :mod:`.heldout` (the held-out
sets), :mod:`.records` (what produced each piece, and what a rerun keeps), :mod:`.table` (the
numbers and ``ablation.md``), :mod:`.runs` (:func:`ablate` itself).
"""

from unidistill.ablate.heldout import HeldOut, eval_file, heldout_apart, heldout_name, heldout_sets
from unidistill.ablate.records import (
    BOOKKEEPING,
    EVAL_FILE,
    PRODUCED_BY,
    REPLACED_DIR,
    RUN_SETTINGS_FILE,
    TRAIN_SPEED_FILE,
    data_identity,
    evaluation_settings,
    model_identity,
    same_training,
    training_settings,
)
from unidistill.ablate.runs import ablate
from unidistill.ablate.table import (
    ABLATION_JSON,
    ABLATION_MD,
    METRICS,
    format_ratio,
    format_table,
    ratio,
    recovery,
    table_heldout_names,
    uniform_baseline_note,
)
from unidistill.ablate.variants import (
    ABLATION_COMMON,
    ONLINE,
    ablation_plan,
    argument_defaults,
    check_variants,
    online_top_k,
    parse_variant,
    plan_from_options,
    read_variants_file,
    run_arguments,
)

__all__ = [
    "ABLATION_COMMON", "ABLATION_JSON", "ABLATION_MD", "BOOKKEEPING", "EVAL_FILE", "METRICS", "ONLINE",
    "PRODUCED_BY", "REPLACED_DIR", "RUN_SETTINGS_FILE", "TRAIN_SPEED_FILE", "HeldOut", "ablate",
    "ablation_plan", "argument_defaults", "check_variants", "data_identity", "eval_file",
    "evaluation_settings", "format_ratio", "format_table", "heldout_apart", "heldout_name",
    "heldout_sets", "model_identity", "online_top_k", "parse_variant", "plan_from_options", "ratio",
    "read_variants_file", "recovery", "run_arguments", "same_training", "table_heldout_names",
    "training_settings", "uniform_baseline_note",
]
