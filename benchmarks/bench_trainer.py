"""Training throughput and peak memory: plain fine-tuning vs distill-from-cache vs online KD.

Usage (CPU, the real SmolLM2-135M teacher, a 30 -> 20 block student, CPython reference text):
    python benchmarks/bench_trainer.py --device cpu --tag cpu
GPU (the tag defaults to the GPU's name, h100 / h200; a cpu tag is refused on CUDA), e.g. on a
random-weight teacher of SmolLM2-135M's shape (benchmarks/random_model.py):
    python benchmarks/bench_trainer.py --teacher /tmp/teacher-135m --data builtin:stdlib_docs \
        --device cuda --bf16 --seq-len 1024 --batch-size 8 --steps 40 --repeats 2
and the large-vocabulary row (a 262 K vocabulary, 8 -> 4 blocks):
    python benchmarks/bench_trainer.py --teacher /tmp/teacher-262k --student-drop-blocks 4 \
        --modes plain,plain_chunked,cache --device cuda --bf16 --tag h100-vocab262k

The student is the teacher minus its last ``--student-drop-blocks`` blocks; ``--align-layers
auto`` (the default) puts the hidden loss on min(5, n) evenly spaced student blocks (4,8,12,16,20
for 20 blocks).

Modes, each in a fresh process so its peak memory is its own, on the same token ids:
  a) plain: the stock Hugging Face Trainer, next-token cross-entropy (what users run without
     a teacher);
  a') plain_chunked: plain fine-tuning through ``distill_from_cache`` with alpha=1, beta=gamma=0,
     i.e. the same chunked CE as (b) and nothing read from the cache but the ids;
  b) cache: ``distill_from_cache``, alpha*CE + beta*T^2*KL (cached top-k + tail) + gamma*cosine
     on 5 aligned layers read from the cache;
  c) online: the same loss with the teacher in memory, full-vocabulary KL;
  c_topk) online with the teacher's top-k (the cache's k) instead of the full vocabulary.
Throughput is tokens/s over the steps after ``--warmup-steps`` (with ``--repeats N`` the modes
run N times round-robin and the medians are reported, which a noisy machine needs); peak memory
is the process's
peak RSS (CPU) and ``torch.cuda.max_memory_allocated`` (GPU). Results go to
benchmarks/results/trainer_<tag>.{json,md}, rewritten after every mode's process (a run stopped
part-way keeps what it finished, marked incomplete), with the machine, the command, the date and the
teacher's shape.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("plain", "plain_chunked", "cache", "cache_default", "online", "online_topk")
# issue 15: (ratio, op, target)
TARGETS = {"throughput_cache_over_plain": (">=", 0.95), "throughput_cache_over_plain_chunked": (">=", 0.95),
           "throughput_cache_over_online": (">=", 1.6), "throughput_cache_default_over_plain": (">=", 0.95),
           "peak_rss_cache_over_plain": ("<=", 1.0), "peak_rss_cache_over_plain_chunked": ("<=", 1.0),
           "peak_cuda_cache_over_plain": ("<=", 1.0), "peak_cuda_cache_over_plain_chunked": ("<=", 1.0)}


def _timing_callback(warmup: int, record: dict):
    from transformers import TrainerCallback

    import torch

    def sync():
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the step's kernels are done, not only queued

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= warmup:
                sync()
            if state.global_step == warmup:
                record["t0"] = time.perf_counter()
            if state.global_step > warmup:
                record["t1"] = time.perf_counter()
                record["timed_steps"] = state.global_step - warmup

    return StepTimer()


def _profiler_callback(opts):
    """torch.profiler over the timed steps (after the warm-up); ``write`` saves its operator table
    (the 30 costliest by self CPU time). Profiled runs are extra runs, never in the medians."""
    from transformers import TrainerCallback

    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    class StepProfiler(TrainerCallback):
        def __init__(self):
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if opts.device != "cpu" else [])
            self.prof = profile(activities=acts, schedule=schedule(wait=opts.warmup_steps, warmup=0,
                                                                   active=opts.steps, repeat=1))
            self.prof.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            self.prof.step()

        def write(self, path: Path):
            self.prof.__exit__(None, None, None)
            path.parent.mkdir(parents=True, exist_ok=True)
            table = self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30,
                                                   max_name_column_width=60)
            path.write_text(f"mode {opts.mode}: torch.profiler over {opts.steps} steps after "
                            f"{opts.warmup_steps} warm-up (torch {torch.__version__})\n\n{table}\n")

    return StepProfiler()


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
                  dataloader_num_workers=opts.dataloader_workers)
    timer = _timing_callback(opts.warmup_steps, record)
    profiler = _profiler_callback(opts) if opts.profile_dir else None
    callbacks = [timer] + ([profiler] if profiler else [])
    if opts.device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    if opts.mode == "plain":
        model = AutoModelForCausalLM.from_pretrained(opts.student)
        ids = CacheDataset(opts.cache, logits=False)

        def collate(items):
            batch = torch.stack([it["input_ids"] for it in items])
            return {"input_ids": batch, "labels": batch}

        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=ids,
                          data_collator=collate, callbacks=callbacks)
        trainer.train()
    elif opts.mode == "plain_chunked":  # the same chunked CE as distill-from-cache, no teacher
        args = DistillationArguments(**common, alpha=1.0, beta=0.0, gamma=0.0, layer_map="uniform",
                                     logits_chunk_size=opts.logits_chunk_size)
        trainer = distill_from_cache(opts.cache, opts.student, args, callbacks=callbacks)
    elif opts.mode == "cache_default":  # the recipe distill-from-cache runs without loss options
        args = DistillationArguments(**common, logits_chunk_size=opts.logits_chunk_size)
        trainer = distill_from_cache(opts.cache, opts.student, args, callbacks=callbacks)
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
                                     callbacks=callbacks)
    if profiler:
        profiler.write(Path(opts.profile_dir) / f"profile_{opts.mode}.txt")
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
    if not 0 < opts.drop_blocks < n_t:
        raise SystemExit(f"--student-drop-blocks {opts.drop_blocks}: the teacher has {n_t} blocks")
    student = keep_blocks(teacher, last_blocks_dropped(n_t, opts.drop_blocks))
    student_dir = work / "student"
    student.save_pretrained(student_dir)
    tokenizer = load_tokenizer(source)
    tokenizer.save_pretrained(student_dir)
    AutoTokenizer.from_pretrained(student_dir)  # the student folder is complete
    n_s = student.config.num_hidden_layers
    del teacher, student
    layer_map = create_layer_map(n_s, n_t, "uniform")
    aligned = [int(i) for i in resolve_align_layers(opts.align_layers, n_s).split(",")]
    layers = ",".join(str(layer_map[i]) for i in aligned)
    cache = work / "cache"
    n_seq = (opts.warmup_steps + opts.steps) * opts.batch_size
    build_cache(BuildConfig(teacher=opts.teacher, data=opts.data, split="train", out=str(cache),
                            seq_len=opts.seq_len, top_k=opts.top_k, layers=layers,
                            max_sequences=n_seq, batch_size=8, shard_size=16,
                            dtype=opts.cache_dtype, device=opts.device), progress=False,
                log=lambda m: print(m, file=sys.stderr))
    return str(cache), str(student_dir)


def resolve_align_layers(align: str, n_student: int) -> str:
    """``auto``: min(5, n) evenly spaced student blocks ending at the last (4,8,12,16,20 of 20)."""
    if align != "auto":
        return align
    m = min(5, n_student)
    return ",".join(str(round(n_student * i / m)) for i in range(1, m + 1))


def ratios_of(results: dict) -> dict:
    """Cache over each other mode measured: throughput and peak memory (RSS; CUDA on a GPU);
    the default recipe (cache_default) over plain fine-tuning."""
    ratios = {}
    pairs = [("cache", o) for o in ("plain", "plain_chunked", "online", "online_topk")]
    pairs += [("cache_default", "plain"), ("cache_default", "plain_chunked")]
    for mine, other in pairs:
        if mine not in results or other not in results:
            continue
        b, o = results[mine], results[other]
        ratios[f"throughput_{mine}_over_{other}"] = b["tokens_per_s"] / o["tokens_per_s"]
        if other == "online_topk":
            continue  # the same process as online but for the targets: throughput only
        ratios[f"peak_rss_{mine}_over_{other}"] = b["peak_rss_mib"] / o["peak_rss_mib"]
        if "peak_cuda_mib" in b and "peak_cuda_mib" in o:
            ratios[f"peak_cuda_{mine}_over_{other}"] = b["peak_cuda_mib"] / o["peak_cuda_mib"]
    return ratios


def write_results(opts, results: dict) -> None:
    from machine import describe_model, machine, short  # benchmarks/machine.py, beside this script

    ratios = ratios_of(results)
    command = "python " + shlex.join(sys.argv)
    runs = {mode: len(r["repeats"]) for mode, r in results.items()}
    complete = all(n == opts.repeats for n in runs.values()) and set(runs) == set(opts.modes.split(","))
    out = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(opts.device),
           "settings": {k: v for k, v in vars(opts).items()
                        if k not in ("results", "mode", "run_dir", "cache", "student", "teacher_info",
                                      "profile_dir",
                                      "student_blocks")},
           "teacher": opts.teacher_info, "student_blocks": opts.student_blocks,
           "runs_per_mode": runs, "complete": complete, "note": opts.note,
           "modes": results, "ratios": {k: round(v, 3) for k, v in ratios.items()},
           "targets": {k: list(v) for k, v in TARGETS.items() if k in ratios}}
    results_dir = Path(opts.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"trainer_{opts.tag}.json").write_text(json.dumps(out, indent=2) + "\n")
    labels = {"plain": "a) plain fine-tuning (HF Trainer, CE)",
              "plain_chunked": "a') plain fine-tuning, unidistill's chunked CE",
              "cache": "b) distill-from-cache",
              "cache_default": "b') distill-from-cache, default loss (0.5 CE + 0.5 KL, T = 1, no hidden)",
              "online": "c) online KD, full vocabulary", "online_topk": f"c') online KD, top-{opts.top_k}"}
    cuda = any("peak_cuda_mib" in r for r in results.values())
    n_t = opts.teacher_info.get("num_hidden_layers")
    md = [f"# Trainer throughput and memory ({opts.tag})", "",
          f"`{command}` on {out['date']}", "", f"Machine: {short(out['machine'])}", "",
          f"Teacher: {describe_model(opts.teacher_info)}. Student: the teacher's first "
          f"{opts.student_blocks} blocks ({n_t} minus the last {opts.drop_blocks}). Batch "
          f"{opts.batch_size} x {opts.seq_len} tokens of {opts.data}; {opts.steps} timed steps after "
          f"{opts.warmup_steps} warm-up; median of {opts.repeats} round-robin repeat(s) per mode"
          + ("" if complete else f" asked, INCOMPLETE: runs done {runs}")
          + f", each in its own process; bf16={opts.bf16}; loss 0.4 CE + 0.4 T^2 KL + 0.2 cosine on "
          f"student blocks {opts.align_layers}; cache top-{opts.top_k}; logits chunk "
          f"{opts.logits_chunk_size} positions; data-loader workers {opts.dataloader_workers}.", "",
          *([opts.note, ""] if opts.note else []),
          *(["Random weights: speed and memory are the shape's; the losses mean nothing.", ""]
            if opts.teacher_info.get("random_weights") else []),
          "| mode | tokens/s | peak RSS MiB |" + (" peak CUDA MiB |" if cuda else ""),
          "|---|---|---|" + ("---|" if cuda else "")]
    for mode, r in results.items():
        row = f"| {labels[mode]} | {r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} |"
        if cuda:
            row += f" {r['peak_cuda_mib']:.0f} |" if "peak_cuda_mib" in r else " |"
        md.append(row)
    md += ["", "| ratio (medians of this run) | value | target |", "|---|---|---|"]
    for k, v in ratios.items():
        op, t = TARGETS.get(k, ("", None))
        md.append(f"| {k} | {v:.3f} | {op} {t} |" if t is not None else f"| {k} | {v:.3f} | |")
    (results_dir / f"trainer_{opts.tag}.md").write_text("\n".join(md) + "\n")
    if complete:
        print("\n".join(md))
    else:
        print(f"[bench] partial results ({runs}) in {results_dir}/trainer_{opts.tag}.md", file=sys.stderr)


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
    p.add_argument("--student-drop-blocks", "--drop-blocks", dest="drop_blocks", type=int, default=10,
                   help="the student is the teacher minus its last N blocks")
    p.add_argument("--align-layers", default="auto",
                   help="student blocks with a hidden loss, or auto: min(5, n) evenly spaced "
                        "(4,8,12,16,20 of 20)")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--logits-chunk-size", type=int, default=None,
                   help="positions per logits chunk [default: the trainer's]")
    p.add_argument("--cache-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="teacher dtype of the cache build that prepares the run")
    p.add_argument("--dataloader-workers", type=int, default=0)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--profile-dir", default=None, help="after the timed rounds, run each mode once more "
                   "under torch.profiler and write DIR/profile_<mode>.txt (not in the medians)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the modes this many times, round-robin, and report medians")
    p.add_argument("--tag", default=None,
                   help="results name: trainer_<tag> [default: cpu on the CPU, the GPU's name on CUDA]")
    p.add_argument("--note", default="", help="a line for the markdown (what this run is for)")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--work", default=None, help="reuse this folder's cache and student")
    # internal: one mode in a child process
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    p.add_argument("--student", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--prepare-in", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)

    if opts.logits_chunk_size is None:
        from unidistill.trainer.arguments import DistillationArguments

        opts.logits_chunk_size = DistillationArguments.logits_chunk_size
    if opts.mode:
        print(json.dumps(run_mode(opts)))
        return
    if opts.prepare_in:
        cache, student = prepare(opts, Path(opts.prepare_in))
        print(json.dumps({"cache": cache, "student": student}))
        return
    modes = opts.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    from machine import model_info, resolve_tag  # benchmarks/machine.py, beside this script

    from unidistill.models.loading import resolve_device, resolve_model_source

    opts.tag = resolve_tag(opts.tag, resolve_device(opts.device).type)
    source = resolve_model_source(opts.teacher)
    opts.teacher_info = model_info(source.path) if not source.gguf_file else {
        "path": opts.teacher, **{k: v for k, v in model_info(source.path, _gguf_config(source)).items()
                                 if k != "path"}}
    work = Path(opts.work or tempfile.mkdtemp(prefix="bench-trainer-"))
    if (work / "cache").exists() and (work / "student").exists():
        cache, student = str(work / "cache"), str(work / "student")
    else:
        # in a child too: on Linux a child's peak RSS starts at its parent's (fork keeps the
        # high-water mark, exec folds it in), and a GPU build would keep its cached memory here
        prep = [sys.executable, __file__, "--prepare-in", str(work), "--teacher", opts.teacher,
                "--data", opts.data, "--device", opts.device, "--seq-len", str(opts.seq_len),
                "--batch-size", str(opts.batch_size), "--warmup-steps", str(opts.warmup_steps),
                "--steps", str(opts.steps), "--student-drop-blocks", str(opts.drop_blocks),
                "--align-layers", opts.align_layers, "--top-k", str(opts.top_k),
                "--cache-dtype", opts.cache_dtype]
        print("[bench] preparing the student and the cache", file=sys.stderr, flush=True)
        done = subprocess.run(prep, check=True, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        made = json.loads(done.stdout.strip().splitlines()[-1])
        cache, student = made["cache"], made["student"]
    opts.student_blocks = json.loads((Path(student) / "config.json").read_text())["num_hidden_layers"]
    opts.align_layers = resolve_align_layers(opts.align_layers, opts.student_blocks)
    runs: dict[str, list[dict]] = {}
    for round_ in range(1, opts.repeats + 1):  # round-robin: drift hits every mode alike
        for mode in modes:
            child = _child(opts, mode, cache, student, work)
            print(f"[bench] round {round_}/{opts.repeats}, mode {mode}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            done = subprocess.run(child, check=True, stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            runs.setdefault(mode, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
            runs[mode][-1]["process_seconds"] = round(time.perf_counter() - t0, 1)
            print(f"[bench] {runs[mode][-1]}", file=sys.stderr, flush=True)
            # rewritten after every mode: a run stopped part-way keeps what it finished
            write_results(opts, {mode: _summary(rs) for mode, rs in runs.items()})
    for mode in modes if opts.profile_dir else ():
        print(f"[bench] profiling mode {mode}", file=sys.stderr, flush=True)
        subprocess.run(_child(opts, mode, cache, student, work) + ["--profile-dir", opts.profile_dir],
                       check=True, stdout=subprocess.DEVNULL, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def _child(opts, mode: str, cache: str, student: str, work: Path) -> list[str]:
    """The command line of one mode's process."""
    return [sys.executable, __file__, "--mode", mode, "--cache", cache, "--student", student,
            "--run-dir", str(work / f"run-{mode}"), "--teacher", opts.teacher,
            "--device", opts.device, "--seq-len", str(opts.seq_len),
            "--batch-size", str(opts.batch_size), "--warmup-steps", str(opts.warmup_steps),
            "--steps", str(opts.steps), "--align-layers", opts.align_layers,
            "--top-k", str(opts.top_k), "--dataloader-workers", str(opts.dataloader_workers),
            ] + (["--bf16"] if opts.bf16 else []) + (
                ["--logits-chunk-size", str(opts.logits_chunk_size)] if opts.logits_chunk_size else [])


def _gguf_config(source):
    from unidistill.models.loading import load_config

    return load_config(source)


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
