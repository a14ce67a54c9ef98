"""Training throughput and peak memory: plain fine-tuning vs distill-from-cache vs online KD.

Usage (CPU, the real SmolLM2-135M teacher, a 30 -> 20 block student, CPython reference text):
    python benchmarks/bench_trainer.py --device cpu --tag cpu
GPU:
    python benchmarks/bench_trainer.py --device cuda --bf16 --seq-len 1024 --batch-size 8 \
        --n-sequences 256 --tag h100

Modes, each in a fresh process so its peak memory is its own, on the same token ids:
  a) plain: the stock Hugging Face Trainer, next-token cross-entropy (what users run without
     a teacher);
  b) cache: ``distill_from_cache``, alpha*CE + beta*T^2*KL (cached top-k + tail) + gamma*cosine
     on 5 aligned layers read from the cache;
  c) online: the same loss with the teacher in memory, full-vocabulary KL;
  c_topk) online with the teacher's top-k (the cache's k) instead of the full vocabulary.
Throughput is tokens/s over the steps after ``--warmup-steps`` (with ``--repeats N`` the modes
run N times round-robin and the medians are reported, which a noisy machine needs); peak memory
is the process's
peak RSS (CPU) and ``torch.cuda.max_memory_allocated`` (GPU). Results go to
benchmarks/results/trainer_<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("plain", "cache", "online", "online_topk")


def _timing_callback(warmup: int, record: dict):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                record["t0"] = time.perf_counter()
            if state.global_step > warmup:
                record["t1"] = time.perf_counter()
                record["timed_steps"] = state.global_step - warmup

    return StepTimer()


def run_mode(opts) -> dict:
    """One mode in this process -> {tokens_per_s, peak_rss_mib, peak_cuda_mib, final_loss}."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from unidistill.models.loading import load_model, resolve_model_source
    from unidistill.trainer.arguments import DistillationArguments
    from unidistill.trainer.dataset import CacheDataset
    from unidistill.trainer.run import distill_from_cache

    record: dict = {}
    steps = opts.warmup_steps + opts.steps
    common = dict(output_dir=opts.run_dir, max_steps=steps, per_device_train_batch_size=opts.batch_size,
                  learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to=[],
                  use_cpu=opts.device == "cpu", bf16=opts.bf16, seed=0, disable_tqdm=True,
                  dataloader_num_workers=0)
    timer = _timing_callback(opts.warmup_steps, record)
    if opts.device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    if opts.mode == "plain":
        model = AutoModelForCausalLM.from_pretrained(opts.student)
        ids = CacheDataset(opts.cache, logits=False)

        def collate(items):
            batch = torch.stack([it["input_ids"] for it in items])
            return {"input_ids": batch, "labels": batch}

        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=ids,
                          data_collator=collate, callbacks=[timer])
        trainer.train()
    else:
        args = DistillationArguments(**common, alpha=0.4, beta=0.4, gamma=0.2, kd_temperature=2.0,
                                     layer_map="uniform", hidden_loss="cosine",
                                     align_layers=opts.align_layers,
                                     logits_chunk_size=opts.logits_chunk_size)
        teacher = None
        if opts.mode.startswith("online"):
            dtype = "bfloat16" if opts.bf16 else "float32"
            teacher = load_model(resolve_model_source(opts.teacher), dtype, "cpu")
        trainer = distill_from_cache(opts.cache, opts.student, args, teacher_model=teacher,
                                     online_top_k=opts.top_k if opts.mode == "online_topk" else None,
                                     callbacks=[timer])
    tokens = record["timed_steps"] * opts.batch_size * opts.seq_len
    result = {"mode": opts.mode, "tokens_per_s": tokens / (record["t1"] - record["t0"]),
              "timed_steps": record["timed_steps"],
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "final_loss": [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]}
    if opts.device != "cpu":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def prepare(opts, work: Path) -> tuple[str, str]:
    """Build the teacher cache and the depth-pruned student once; returns their paths."""
    from transformers import AutoTokenizer

    from unidistill.cache_builder.build import build_cache
    from unidistill.cache_builder.config import BuildConfig
    from unidistill.models.layer_map import create_layer_map
    from unidistill.models.loading import load_model, load_tokenizer, resolve_model_source
    from unidistill.pruning.depth import keep_blocks, last_blocks_dropped

    source = resolve_model_source(opts.teacher)
    teacher = load_model(source, "float32", "cpu")
    n_t = teacher.config.num_hidden_layers
    student = keep_blocks(teacher, last_blocks_dropped(n_t, opts.drop_blocks))
    student_dir = work / "student"
    student.save_pretrained(student_dir)
    tokenizer = load_tokenizer(source)
    tokenizer.save_pretrained(student_dir)
    AutoTokenizer.from_pretrained(student_dir)  # the student folder is complete
    n_s = student.config.num_hidden_layers
    del teacher, student
    layer_map = create_layer_map(n_s, n_t, "uniform")
    aligned = [int(i) for i in opts.align_layers.split(",")]
    layers = ",".join(str(layer_map[i]) for i in aligned)
    cache = work / "cache"
    n_seq = (opts.warmup_steps + opts.steps) * opts.batch_size
    build_cache(BuildConfig(teacher=opts.teacher, data=opts.data, split="train", out=str(cache),
                            seq_len=opts.seq_len, top_k=opts.top_k, layers=layers,
                            max_sequences=n_seq, batch_size=8, shard_size=16,
                            dtype="float32", device=opts.device), progress=False,
                log=lambda m: print(m, file=sys.stderr))
    return str(cache), str(student_dir)


def write_results(opts, results: dict) -> None:
    from machine import machine  # benchmarks/machine.py, beside this script

    a, b, c = results["plain"], results["cache"], results["online"]
    ratios = {"throughput_cache_over_plain": b["tokens_per_s"] / a["tokens_per_s"],
              "throughput_cache_over_online": b["tokens_per_s"] / c["tokens_per_s"],
              "peak_rss_cache_over_plain": b["peak_rss_mib"] / a["peak_rss_mib"],
              "peak_rss_cache_over_online": b["peak_rss_mib"] / c["peak_rss_mib"]}
    if "peak_cuda_mib" in b:
        ratios["peak_cuda_cache_over_plain"] = b["peak_cuda_mib"] / a["peak_cuda_mib"]
        ratios["peak_cuda_cache_over_online"] = b["peak_cuda_mib"] / c["peak_cuda_mib"]
    if "online_topk" in results:
        ratios["throughput_cache_over_online_topk"] = b["tokens_per_s"] / results["online_topk"]["tokens_per_s"]
    targets = {"throughput_cache_over_plain": (">=", 0.85), "throughput_cache_over_online": (">=", 1.5),
               "peak_rss_cache_over_plain": ("<=", 1.15), "peak_cuda_cache_over_plain": ("<=", 1.15)}
    command = "python " + " ".join(sys.argv)
    out = {"command": command, "date": time.strftime("%Y-%m-%d"), "machine": machine(opts.device),
           "settings": {k: v for k, v in vars(opts).items() if k not in ("results", "mode", "run_dir")},
           "modes": results, "ratios": {k: round(v, 3) for k, v in ratios.items()}}
    results_dir = Path(opts.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"trainer_{opts.tag}.json").write_text(json.dumps(out, indent=2) + "\n")
    labels = {"plain": "a) plain fine-tuning (HF Trainer, CE)", "cache": "b) distill-from-cache",
              "online": "c) online KD, full vocabulary", "online_topk": f"c') online KD, top-{opts.top_k}"}
    md = [f"# Trainer throughput and memory ({opts.tag})", "",
          f"`{command}` on {out['date']}, {json.dumps(out['machine'])}", "",
          f"Student: SmolLM2-135M with its last {opts.drop_blocks} blocks dropped; batch "
          f"{opts.batch_size} x {opts.seq_len} tokens; {opts.steps} timed steps after "
          f"{opts.warmup_steps} warm-up; median of {opts.repeats} round-robin repeat(s) per mode, each "
          f"in its own process; bf16={opts.bf16}; loss 0.4 CE + 0.4 T^2 KL + 0.2 cosine on "
          f"student blocks {opts.align_layers}; cache top-{opts.top_k}.", "",
          "| mode | tokens/s | peak RSS MiB |" + (" peak CUDA MiB |" if "peak_cuda_mib" in b else ""),
          "|---|---|---|" + ("---|" if "peak_cuda_mib" in b else "")]
    for mode, r in results.items():
        row = f"| {labels[mode]} | {r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} |"
        if "peak_cuda_mib" in r:
            row += f" {r['peak_cuda_mib']:.0f} |"
        md.append(row)
    md += ["", "| ratio (medians of this run) | value | target |", "|---|---|---|"]
    for k, v in ratios.items():
        op, t = targets.get(k, ("", None))
        md.append(f"| {k} | {v:.3f} | {op} {t} |" if t is not None else f"| {k} | {v:.3f} | |")
    (results_dir / f"trainer_{opts.tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="builtin:smollm2")
    p.add_argument("--data", default="builtin:pydoc_topics")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--drop-blocks", type=int, default=10)
    p.add_argument("--align-layers", default="4,8,12,16,20", help="student blocks with a hidden loss")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--logits-chunk-size", type=int, default=None,
                   help="positions per logits chunk [default: the trainer's]")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--repeats", type=int, default=1,
                   help="run the modes this many times, round-robin, and report medians")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--work", default=None, help="reuse this folder's cache and student")
    # internal: one mode in a child process
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    p.add_argument("--student", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)

    if opts.logits_chunk_size is None:
        from unidistill.trainer.arguments import DistillationArguments

        opts.logits_chunk_size = DistillationArguments.logits_chunk_size
    if opts.mode:
        print(json.dumps(run_mode(opts)))
        return
    work = Path(opts.work or tempfile.mkdtemp(prefix="bench-trainer-"))
    if (work / "cache").exists() and (work / "student").exists():
        cache, student = str(work / "cache"), str(work / "student")
    else:
        cache, student = prepare(opts, work)
    runs: dict[str, list[dict]] = {}
    for mode in [m for _ in range(opts.repeats) for m in opts.modes.split(",")]:  # round-robin
        child = [sys.executable, __file__, "--mode", mode, "--cache", cache, "--student", student,
                 "--run-dir", str(work / f"run-{mode}"), "--teacher", opts.teacher,
                 "--device", opts.device, "--seq-len", str(opts.seq_len),
                 "--batch-size", str(opts.batch_size), "--warmup-steps", str(opts.warmup_steps),
                 "--steps", str(opts.steps), "--align-layers", opts.align_layers,
                 "--top-k", str(opts.top_k)] + (["--bf16"] if opts.bf16 else []) + (
                     ["--logits-chunk-size", str(opts.logits_chunk_size)] if opts.logits_chunk_size else [])
        print(f"[bench] mode {mode}", file=sys.stderr)
        done = subprocess.run(child, check=True, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        runs.setdefault(mode, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"[bench] {runs[mode][-1]}", file=sys.stderr)
    results = {mode: _summary(rs) for mode, rs in runs.items()}
    write_results(opts, results)


def _summary(repeats: list[dict]) -> dict:
    """Median throughput and peak memory over the repeats of one mode (each run kept too)."""
    import statistics

    out = dict(repeats[-1])
    for key in ("tokens_per_s", "peak_rss_mib", "peak_cuda_mib"):
        if key in out:
            out[key] = statistics.median(r[key] for r in repeats)
    out["repeats"] = repeats
    return out


if __name__ == "__main__":
    main()
