"""``unidistill report RUN_DIR``: the plots people look at instead of reading logs.

* ``losses.png``: the total loss and each component (CE, KL, hidden) over the training steps,
  from the run's ``trainer_state.json``;
* ``layer_cosine.png``: heatmap of the cosine similarity between the student's layers (rows)
  and the cached teacher layers (columns), from ``eval.json`` (``unidistill evaluate --output``);
* ``recovery.png``: for each run of an ablation (``ablation.json``), the share of the
  log-perplexity gap it closes and, beside it, its next-token accuracy and perplexity as ratios
  to the teacher's; the runs of an ablation get their own plots in their folders too;
* ``ablation.md``: the ablation's table rendered again from ``ablation.json`` (a table an older
  version wrote gets today's columns, ``-`` where its numbers do not allow them).
"""

from __future__ import annotations

import json
from pathlib import Path

from unidistill.errors import ConfigError

TERMS = (("loss", "total"), ("loss_ce", "CE"), ("loss_kl", "KL"), ("loss_hidden", "hidden"))


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ConfigError("unidistill report needs matplotlib: pip install 'unidistill[plots]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_losses(run_dir: Path) -> Path | None:
    state = run_dir / "trainer_state.json"
    if not state.is_file():
        return None
    history = [h for h in json.loads(state.read_text())["log_history"] if "loss" in h and "step" in h]
    if not history:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(TERMS), figsize=(4 * len(TERMS), 3.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], TERMS):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, ms=3)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("loss")
    fig.suptitle(f"{run_dir.name}: loss components")
    return _save(fig, run_dir / "losses.png")


def plot_layer_cosine(run_dir: Path) -> Path | None:
    path = run_dir / "eval.json"
    if not path.is_file():
        return None
    ev = json.loads(path.read_text())
    rows = [(i, r) for i, r in zip(ev.get("student_layers", []), ev.get("layer_cosine", []))
            if any(v is not None for v in r)]
    if not rows:
        return None
    import numpy as np

    plt = _pyplot()
    matrix = np.array([[np.nan if v is None else v for v in r] for _, r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(max(5.5, 2.5 + 0.6 * matrix.shape[1]),
                                    max(3.5, 1.5 + 0.3 * matrix.shape[0])))
    image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r", aspect="auto")
    ax.set_xticks(range(matrix.shape[1]), [str(j) for j in ev["teacher_layers"]])
    ax.set_yticks(range(matrix.shape[0]), [str(i) for i, _ in rows])
    ax.set_xlabel("teacher layer (hidden_states index)")
    ax.set_ylabel("student layer")
    for (r, c), v in np.ndenumerate(matrix):
        if not np.isnan(v) and matrix.size <= 400:
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label="mean cosine similarity")
    ax.set_title(f"{run_dir.name}: hidden-state cosine", fontsize=10)
    return _save(fig, run_dir / "layer_cosine.png")


def _bars(ax, rows, values, fmt: str, ylabel: str, title: str, reference: float | None) -> None:
    bars = ax.bar(range(len(rows)), values, color=["tab:green" if v >= 0 else "tab:red" for v in values])
    ax.bar_label(bars, labels=[format(v, fmt) for v in values], fontsize=8)
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=30, ha="right")
    ax.axhline(0, color="black", lw=0.8)
    if reference is not None:
        ax.axhline(reference, color="grey", lw=0.8, ls="--")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)


def plot_recovery(run_dir: Path) -> Path | None:
    path = run_dir / "ablation.json"
    if not path.is_file():
        return None
    rows = [r for r in json.loads(path.read_text())["rows"]
            if r["name"] not in ("teacher", "student (before)") and r["recovery_pct"] is not None]
    if not rows:
        return None
    panels = [([r["recovery_pct"] for r in rows], ".1f", "% of the log-perplexity gap closed",
               "gap to the teacher closed (recovery %)", 100.0, False)]
    if all(r.get("accuracy_ratio") is not None for r in rows):
        panels.append(([100 * r["accuracy_ratio"] for r in rows], ".1f", "% of the teacher's accuracy",
                       "next-token accuracy ÷ teacher", 100.0, False))
    if all(r.get("perplexity_ratio") is not None for r in rows):
        panels.append(([r["perplexity_ratio"] for r in rows], ".3g", "perplexity ÷ teacher's (1 = teacher)",
                       "perplexity ÷ teacher", 1.0, True))
    plt = _pyplot()
    width = max(4.0, 1.1 * len(rows) + 1.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 3.8), squeeze=False)
    for ax, (values, fmt, ylabel, title, reference, may_be_log) in zip(axes[0], panels):
        _bars(ax, rows, values, fmt, ylabel, title, reference)
        if may_be_log and min(values) > 0 and max(values) > 100:
            ax.set_yscale("log")  # perplexity ratios of badly pruned students span decades
    return _save(fig, run_dir / "recovery.png")


def write_ablation_table(run_dir: Path) -> Path | None:
    """``ablation.md`` rendered from ``ablation.json`` (one renderer: :func:`format_table`)."""
    from unidistill.ablate.table import ABLATION_JSON, ABLATION_MD, format_table
    from unidistill.storage.files import atomic_write_bytes

    path = run_dir / ABLATION_JSON
    if not path.is_file():
        return None
    atomic_write_bytes(run_dir / ABLATION_MD, format_table(json.loads(path.read_text())).encode())
    return run_dir / ABLATION_MD


def report(run_dir) -> list[Path]:
    """Write every plot (and the ablation table) the folder's files allow; returns the files written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a folder; pass a distill-from-cache --out folder or an "
                          "ablate --out folder")
    written = [p for p in (plot_losses(run_dir), plot_layer_cosine(run_dir), plot_recovery(run_dir),
                           write_ablation_table(run_dir)) if p]
    ablation = run_dir / "ablation.json"
    if ablation.is_file():
        for row in json.loads(ablation.read_text())["rows"]:
            sub = run_dir / row["name"]
            if sub.is_dir():
                written += [p for p in (plot_losses(sub), plot_layer_cosine(sub)) if p]
    if not written:
        raise ConfigError(f"nothing to plot in {run_dir}: expected trainer_state.json (a finished "
                          "distill-from-cache run), eval.json (unidistill evaluate --output) or "
                          "ablation.json (unidistill ablate)")
    return written
