"""Logit representations side by side: bytes on disk, fidelity to the full teacher, build and read
speed, and what a short distillation from each gives.

Usage (CPU, the real SmolLM2-135M teacher over CPython's reference text, about 20 minutes):
    python benchmarks/bench_storage.py --device cpu --tag cpu
GPU:
    python benchmarks/bench_storage.py --device cuda --seq-len 1024 --n-sequences 256 \
        --distill-steps 100 --eval-sequences 64 --tag h100

One cache per representation (``topk`` and ``topk-q8`` with k = 64, ``sampled`` with S = 12 and
64 draws, ``exact``) over the same packed sequences, each with the same hidden layers. For each:
  * bytes/token on disk of the logit arrays (exact: the head file, spread over the cache's tokens)
    and of each hidden layer;
  * hidden states stored as fp16, bf16 and int8 (massive tokens apart, per-channel block scales):
    bytes/token and relative error (per token and whole array) against the teacher's fp32 states;
  * fidelity against the teacher's full fp32 distribution p on the first --fidelity-sequences:
    - KL(p || stored): top-k with the tail spread evenly over the other ids, exact rebuilt from
      the cached fp16 state; sampled stores zero for every id not drawn, so the column gives
      KL(stored || p) for it instead (marked);
    - the gradient of the KD loss (T = 1, and T = 2 where the cache serves it) with respect to
      a student's logits, from the stored
      targets against the one from p: relative error ||g - g*|| / ||g*|| and cosine. The student
      is the teacher with its last 6 blocks dropped (untrained, so far from the teacher);
  * build tokens/s against a bare teacher forward over the same batches;
  * read tokens/s through ``CacheDataset`` + DataLoader (0 and 2 workers);
  * with --distill-steps > 0: the same pruned student (``unidistill prune``) distilled from each
    cache (alpha 0.5 CE + beta 0.5 KL at T = 1, no hidden loss) and evaluated on held-out text:
    one seed, so a smoke test that each representation trains, not a ranking of them.
Results: benchmarks/results/storage_<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate
from machine import machine  # benchmarks/machine.py, beside this script

from bench_cache_build import bare_forward_tps  # noqa: E402
from unidistill.cache_builder.build import build_cache
from unidistill.cache_builder.capture import TeacherRunner
from unidistill.cache_builder.config import BuildConfig
from unidistill.model_logits import head_logits
from unidistill.models.loading import load_model, load_tokenizer, resolve_device, resolve_model_source
from unidistill.models.targets import TeacherTargets
from unidistill.pruning.depth import keep_blocks
from unidistill.storage import CacheReader, decode_hidden
from unidistill.storage.info import cache_info
from unidistill.text.data import iter_documents, pack_documents
from unidistill.trainer.dataset import CacheDataset
from unidistill.trainer.losses import sums_from_logits

RESULTS = Path(__file__).resolve().parent / "results"
REPRESENTATIONS = {"topk-64": dict(logits="topk", top_k=64), "topk-q8-64": dict(logits="topk-q8", top_k=64),
                   "sampled-12": dict(logits="sampled", samples=12),
                   "sampled-64": dict(logits="sampled", samples=64), "exact": dict(logits="exact")}


def stored_targets(reader: CacheReader, index: int, head, temperature: float = 1.0) -> dict:
    """The stored teacher targets of one sequence at KD temperature T as loss inputs (B = 1)."""
    seq = reader.read(index, layers=[], temperature=temperature)
    if reader.logits_mode == "exact":
        final = torch.from_numpy(seq["teacher_final_hidden"]).float()             # (L, D)
        return {"teacher_logits": head_logits(final, *head)[None]}                 # (1, L, V)
    return {"teacher_ids": torch.from_numpy(seq["teacher_ids"].astype(np.int64))[None],
            "teacher_logp": torch.from_numpy(seq["teacher_logp"]).float()[None],
            "teacher_log_tail": torch.from_numpy(seq["teacher_log_tail"]).float()[None]}


def stored_log_probs(reader: CacheReader, targets: dict, vocab: int) -> torch.Tensor:
    """The distribution the cache stores, over the whole vocabulary (L, V) in log space."""
    if "teacher_logits" in targets:
        return torch.log_softmax(targets["teacher_logits"][0], -1)
    ids, logp, tail = (targets[k][0] for k in ("teacher_ids", "teacher_logp", "teacher_log_tail"))
    if reader.logits_mode == "sampled":  # counts / S on the drawn ids (unused slots add 0)
        return torch.zeros(ids.shape[0], vocab).scatter_add(-1, ids, logp.exp()).log()
    k = ids.shape[-1]
    spread = (tail - np.log(vocab - k)).unsqueeze(-1).expand(-1, vocab)            # (L, V)
    return spread.scatter(-1, ids, logp)


def kd_grad(student_logits: torch.Tensor, temperature: float = 1.0, **teacher) -> torch.Tensor:
    z = student_logits.clone().requires_grad_(True)                                # (1, L, V)
    labels = torch.full(z.shape[:2], -100)
    mask = torch.ones(z.shape[:2], dtype=torch.bool)
    teacher_logits = teacher.pop("teacher_logits", None)  # exact: the full logits
    targets = None if teacher_logits is not None else TeacherTargets.from_fields(teacher)
    kl = sums_from_logits(z, labels, targets, temperature, "forward", mask=mask, compute_ce=False,
                          teacher_logits=teacher_logits)[2]
    kl.backward()
    return z.grad[0]                                                               # (L, V)


def fidelity(reader: CacheReader, teacher, student, n_seq: int) -> dict:
    """KL between the stored and the full teacher distribution (T = 1), and the KD gradient from
    the stored targets against the one from the full teacher, at T = 1 and, where the cache
    serves it (top-k: the exact tempered tail; exact: always), at T = 2."""
    head = reader.head() if reader.logits_mode == "exact" else None
    vocab = reader.layout.vocab_size
    temps = [1.0] if reader.logits_mode == "sampled" else [1.0, 2.0]
    kls = []
    err = {t: [0.0, 0.0] for t in temps}
    cos = {t: [] for t in temps}
    for i in range(min(n_seq, len(reader))):
        ids = torch.from_numpy(reader.read(i, layers=[], logits=False)["input_ids"].astype(np.int64))[None]
        with torch.no_grad():
            true_logits = teacher(ids).logits.float()                              # (1, L, V)
            student_logits = student(ids).logits.float()
        log_p = torch.log_softmax(true_logits[0], -1)
        targets = stored_targets(reader, i, head)
        log_s = stored_log_probs(reader, targets, vocab)
        if reader.logits_mode == "sampled":                                       # KL(stored || p)
            s = log_s.exp()
            kls.append(float(torch.where(s > 0, s * (log_s - log_p), 0.0).sum(-1).mean()))
        else:                                                                      # KL(p || stored)
            kls.append(float((log_p.exp() * (log_p - log_s)).sum(-1).mean()))
        for t in temps:
            at_t = targets if t == 1.0 else stored_targets(reader, i, head, t)
            g = kd_grad(student_logits, t, **at_t)
            g_true = kd_grad(student_logits, t, teacher_logits=true_logits)
            err[t][0] += float(((g - g_true) ** 2).sum())
            err[t][1] += float((g_true ** 2).sum())
            cos[t].append(float(torch.nn.functional.cosine_similarity(g, g_true, dim=-1).mean()))
    out = {"kl": float(np.mean(kls)),
           "kl_direction": "stored||p" if reader.logits_mode == "sampled" else "p||stored"}
    for t in temps:
        suffix = "" if t == 1.0 else f"_t{t:g}"
        out[f"grad_rel_error{suffix}"] = (err[t][0] / err[t][1]) ** 0.5
        out[f"grad_cosine{suffix}"] = float(np.mean(cos[t]))
    return out


def hidden_error(reader: CacheReader, runner, n_seq: int) -> dict:
    """Relative error of every cached layer against the fp32 teacher states over the first n_seq
    sequences: per token ||stored - h|| / ||h|| (mean and max over tokens), and over the whole
    array (which the few massive tokens dominate, so it flatters a code that keeps them well)."""
    per_token, num, den = {}, {}, {}
    for i in range(min(n_seq, len(reader))):
        seq = reader.read(i, logits=False)
        _, captured = runner.forward(torch.from_numpy(seq["input_ids"].astype(np.int64))[None])
        for j, stored in seq["hidden"].items():
            exact = captured[j][0].float()
            diff = decode_hidden(stored, reader.layout.hidden_dtype).float() - exact
            per_token.setdefault(j, []).append(diff.norm(dim=-1) / exact.norm(dim=-1))
            num[j] = num.get(j, 0.0) + float((diff ** 2).sum())
            den[j] = den.get(j, 0.0) + float((exact ** 2).sum())
    return {f"hidden/{j}": {"token_mean": float(torch.cat(per_token[j]).mean()),
                            "token_max": float(torch.cat(per_token[j]).max()),
                            "whole": (num[j] / den[j]) ** 0.5} for j in num}


def read_tps(root: Path, layers: list[int], workers: int, batch_size: int = 4) -> float:
    dataset = CacheDataset(root, layers=layers)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         num_workers=workers, collate_fn=default_collate,
                                         generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    n = sum(batch["input_ids"].numel() for batch in loader)
    return n / (time.perf_counter() - t0)


def distill(opts, work: Path, caches: dict) -> dict:
    """Prune once, distill the student from each cache, evaluate each on held-out text."""
    bin_dir = Path(sys.executable).parent
    student = work / "student"
    if not (student / "config.json").is_file():
        subprocess.run([str(bin_dir / "unidistill"), "prune", "--model", opts.teacher, "--out", str(student),
                        "--drop-layers", "6", "--mlp-keep", "0.67", "--hidden-keep", "0.78",
                        "--calib-data", opts.data, "--calib-sequences", "16", "--device", opts.device],
                       check=True)
    from unidistill.evaluate import evaluate
    from unidistill.trainer.arguments import DistillationArguments
    from unidistill.trainer.run import distill_from_cache

    def heldout(model):
        return evaluate(model, data=opts.data, max_sequences=opts.eval_sequences, seq_len=opts.seq_len,
                        device=opts.device, progress=False).perplexity

    out = {"student_before": heldout(str(student))}
    for name, root in caches.items():
        run = work / f"run-{name}"
        args = DistillationArguments(
            output_dir=str(run), max_steps=opts.distill_steps, per_device_train_batch_size=4,
            learning_rate=3e-4, warmup_steps=2, lr_scheduler_type="cosine", alpha=0.5, beta=0.5,
            gamma=0.0, kd_temperature=1.0, save_strategy="no", report_to=[], logging_steps=1,
            use_cpu=opts.device == "cpu", seed=0, data_seed=0, disable_tqdm=True)
        t0 = time.perf_counter()
        trainer = distill_from_cache(root, str(student), args)
        runtime = next(e["train_runtime"] for e in reversed(trainer.state.log_history) if "train_runtime" in e)
        out[name] = {"heldout_perplexity": heldout(str(run)), "train_seconds": round(time.perf_counter() - t0, 1),
                     "trainer_tokens_per_s": round(opts.distill_steps * 4 * opts.seq_len / runtime, 1)}
    return out


def render(result: dict) -> str:
    """The markdown table of a result (also from a saved JSON: ``--render results/storage_cpu.json``)."""
    o, rows, hidden_rows, effect = (result["settings"], result["representations"], result["hidden"],
                                    result["distillation"])
    reads = {name: {int(w): v for w, v in r["read_tokens_per_s"].items()} for name, r in rows.items()}
    md = [f"# Logit representations ({o['tag']})", "",
          f"`{result['command']}` on {result['date']}, {json.dumps(result['machine'])}", "",
          f"{o['n_sequences']} x {o['seq_len']} tokens of `{o['data']}`; hidden layers {o['layers']} "
          f"(fp16) in every cache; fidelity on {o['fidelity_sequences']} sequences against the teacher's "
          "fp32 distribution; KD gradient w.r.t. the logits of the teacher minus its last 6 blocks.", "",
          "| representation | logits B/token | hidden B/token, per layer | KL to the teacher | KD grad rel. error "
          "T = 1 | KD grad cosine T = 1 | KD grad cosine T = 2 (rel. error) | build / bare forward "
          "| read tok/s (0 / 2 workers) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        kl = f"{r['kl']:.2e}" + (" (stored‖p)" if r["kl_direction"] == "stored||p" else "")
        head = f" + head {r['head_bytes'] / 2 ** 20:.0f} MiB once" if r.get("head_bytes") else ""
        per_layer = ", ".join(f"{k.split('/')[1]}: {v}" for k, v in r["hidden_bytes_per_token"].items())
        t2 = (f"{r['grad_cosine_t2']:.4f} ({r['grad_rel_error_t2']:.3f})" if "grad_cosine_t2" in r
              else "not served (T = 1 only)")
        md.append(f"| {name} | {r['logits_bytes_per_token']}{head} | {per_layer} | {kl} | "
                  f"{r['grad_rel_error']:.3f} | {r['grad_cosine']:.4f} | {t2} | {r['build_over_bare']:.2f} | "
                  f"{reads[name][0]:.0f} / {reads[name][2]:.0f} |")
    fp16_bytes = hidden_rows["float16"]["disk_bytes_per_token"]
    md += ["", f"Hidden states ({o['layers']}), all layers together, against the fp32 teacher states:", "",
           "| stored as | bytes/token on disk | vs fp16 | rel. error per token, mean (worst layer) "
           "| per token, max | whole array (worst layer) |", "|---|---|---|---|---|---|"]
    for dtype, h in hidden_rows.items():
        worst = {k: max(e[k] for e in h["relative_error"].values()) for k in ("token_mean", "token_max", "whole")}
        md.append(f"| {dtype} | {h['disk_bytes_per_token']} | {h['disk_bytes_per_token'] / fp16_bytes:.3f} | "
                  f"{worst['token_mean']:.2e} | {worst['token_max']:.2e} | {worst['whole']:.2e} |")
    if effect:
        md += ["", f"Distillation, {o['distill_steps']} steps x 4 x {o['seq_len']} tokens per run, held-out "
               f"perplexity ({o['eval_sequences']} sequences): untrained student "
               f"{effect['student_before']:.1f}; " + "; ".join(
                   f"{name} {effect[name]['heldout_perplexity']:.1f}" for name in rows) + ".",
               "", "Read path against the trainer's consumption (the loader reads every hidden layer; the "
               "trainer's tokens/s over its training loop, model loading excluded):", "",
               "| representation | trainer tok/s | loader tok/s, 0 workers | loader / trainer |", "|---|---|---|---|"]
        for name in rows:
            tps = effect[name]["trainer_tokens_per_s"]
            md.append(f"| {name} | {tps:.0f} | {reads[name][0]:.0f} | {reads[name][0] / tps:.0f}x |")
    return "\n".join(md) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="builtin:smollm2")
    p.add_argument("--data", default="builtin:pydoc_topics")
    p.add_argument("--device", default="auto")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--n-sequences", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--layers", default="8,15,23")
    p.add_argument("--fidelity-sequences", type=int, default=40)
    p.add_argument("--distill-steps", type=int, default=0,
                   help="a short distillation from each cache (one seed: a smoke test, not a ranking; "
                        "compare recipes with benchmarks/recovery.py, which reports the seed spread)")
    p.add_argument("--eval-sequences", type=int, default=12)
    p.add_argument("--work", default="out/bench-storage")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--render", metavar="JSON", help="only rewrite the markdown of a saved result")
    opts = p.parse_args(argv)
    if opts.render:
        path = Path(opts.render)
        path.with_suffix(".md").write_text(render(json.loads(path.read_text())))
        return
    device = resolve_device(opts.device)
    opts.device = device.type
    work = Path(opts.work)

    source = resolve_model_source(opts.teacher)
    tok = load_tokenizer(source)
    ids = pack_documents(iter_documents(opts.data, split="train"), tok, opts.seq_len, opts.n_sequences)
    teacher = load_model(source, "float32", str(device))
    bare_forward_tps(teacher, ids[: opts.batch_size], opts.batch_size, device)  # warm-up
    bare = bare_forward_tps(teacher, ids, opts.batch_size, device)
    student = keep_blocks(copy.deepcopy(teacher), list(range(teacher.config.num_hidden_layers - 6)))

    rows, caches = {}, {}
    for name, kw in REPRESENTATIONS.items():
        root = work / f"cache-{name}"
        cfg = BuildConfig(teacher=opts.teacher, data=opts.data, split="train", out=str(root),
                          seq_len=opts.seq_len, layers=opts.layers, max_sequences=opts.n_sequences,
                          batch_size=opts.batch_size, device=opts.device, overwrite=True, **kw)
        manifest = build_cache(cfg, progress=False, log=lambda m: print(m, file=sys.stderr))
        info = cache_info(root)
        hidden = {name_: a["disk_bytes_per_token"] for name_, a in info["arrays"].items()
                  if name_.startswith("hidden/")}
        final_layer = f"hidden/{info['layers'][-1]}" if kw["logits"] == "exact" else None
        logits_bpt = (hidden.pop(final_layer) if final_layer else info["bytes_per_token"]["logits_disk"])
        rows[name] = {
            # exact: the cached final hidden state per token; its head file, stored once, apart
            "logits_bytes_per_token": round(logits_bpt, 1),
            "head_bytes": info["head_bytes"],
            "hidden_bytes_per_token": {k: round(v, 1) for k, v in hidden.items()},
            "build_tokens_per_s": manifest["build"]["tokens_per_second"],
            "build_over_bare": round(manifest["build"]["tokens_per_second"] / bare, 3),
            "read_tokens_per_s": {w: round(read_tps(root, [int(x) for x in opts.layers.split(",")], w), 1)
                                  for w in (0, 2)},
            **fidelity(CacheReader(root), teacher, student, opts.fidelity_sequences),
        }
        caches[name] = root
        print(name, json.dumps(rows[name]), file=sys.stderr)
    hidden_rows = {}
    runner = TeacherRunner(teacher, [int(x) for x in opts.layers.split(",")], None)
    for dtype in ("float16", "bfloat16", "int8"):
        root = work / f"cache-hidden-{dtype}"
        build_cache(BuildConfig(teacher=opts.teacher, data=opts.data, split="train", out=str(root),
                                seq_len=opts.seq_len, layers=opts.layers, max_sequences=opts.n_sequences,
                                batch_size=opts.batch_size, device=opts.device, overwrite=True,
                                hidden_dtype=dtype), progress=False, log=lambda m: print(m, file=sys.stderr))
        arrays = cache_info(root)["arrays"]
        hidden_rows[dtype] = {
            "disk_bytes_per_token": round(sum(a["disk_bytes_per_token"] for n, a in arrays.items()
                                              if n.startswith("hidden/")), 1),
            "relative_error": hidden_error(CacheReader(root), runner, opts.fidelity_sequences)}
        print(dtype, json.dumps(hidden_rows[dtype]), file=sys.stderr)
    runner.close()
    del teacher, student
    effect = distill(opts, work, caches) if opts.distill_steps > 0 else None

    command = "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:]))
    result = {"command": command, "date": time.strftime("%Y-%m-%d"), "machine": machine(opts.device),
              "settings": {k: v for k, v in vars(opts).items() if k != "results"},
              "bare_forward_tokens_per_s": round(bare, 1), "representations": rows,
              "hidden": hidden_rows, "distillation": effect}
    results = Path(opts.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"storage_{opts.tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = render(result)
    (results / f"storage_{opts.tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
