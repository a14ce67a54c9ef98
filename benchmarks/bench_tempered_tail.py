"""How wrong is a top-k + tail KD target at T != 1, and how right is it now?

The real SmolLM2-135M teacher is its own student: the KL between the two is the error of the
target alone (0 for an exact one). Three ways to give the teacher's tail bucket at temperature T:
  * one token: the T = 1 log-tail divided by T, as if the tail were one token (unidistill before
    the tempered tail; what the recovery runs at T = 2 trained against);
  * exact: the stored ``log Σ_tail p^(1/T)`` (``cache-build --temperatures``);
  * uniform: the tail mass spread evenly over the V - K other ids (``--tail-approximation
    uniform``, for a temperature the cache has no exact tail for).
Also the same teacher's top-k + exact tail against its full distribution, KL(p_T || buckets_T),
which is 0 by construction of the buckets (a check), and per-position worst cases.

Usage (about 2 minutes on 2 CPU cores):
    python benchmarks/bench_tempered_tail.py --tag cpu
Results: benchmarks/results/tempered_tail_<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine  # benchmarks/machine.py, beside this script

from unidistill.models.loading import load_model, load_tokenizer, resolve_model_source
from unidistill.models.teacher import top_k_with_tail
from unidistill.storage.reader import uniform_tail
from unidistill.text.data import iter_documents, pack_documents
from unidistill.trainer.losses import bucket_log_probs, kl_per_position

RESULTS = Path(__file__).resolve().parent / "results"
TEMPERATURES = (0.5, 1.0, 2.0, 3.0, 4.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="builtin:smollm2")
    p.add_argument("--data", default="builtin:stdlib_docs")
    p.add_argument("--split", default="heldout")
    p.add_argument("--sequences", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--tag", default="cpu")
    p.add_argument("--results", default=str(RESULTS))
    opts = p.parse_args(argv)

    source = resolve_model_source(opts.teacher)
    tok = load_tokenizer(source)
    ids = pack_documents(iter_documents(opts.data, split=opts.split), tok, opts.seq_len, opts.sequences)
    model = load_model(source, "float32", "cpu")
    rows = {t: {"one_token": [], "exact": [], "uniform": []} for t in TEMPERATURES}
    for seq in ids:
        with torch.no_grad():
            z = model(torch.from_numpy(seq.astype(np.int64))[None]).logits[0].float()   # (L, V)
        k, vocab = opts.top_k, z.shape[-1]
        temps = tuple(t for t in TEMPERATURES if t != 1.0)
        top_ids, logp, tail, tempered = top_k_with_tail(z.clone(), k, temps)
        # the cache stores fp16 log-probs and tails: measure what a cache gives
        logp, tail, tempered = (x.half().float() for x in (logp, tail, tempered))
        for t in TEMPERATURES:
            exact_tail = tail if t == 1.0 else tempered[:, temps.index(t)]
            targets = {"one_token": tail / t, "exact": exact_tail,
                       "uniform": torch.from_numpy(uniform_tail(tail.numpy(), t, vocab - k))}
            for name, t_tail in targets.items():
                s_logq, t_logp = bucket_log_probs(z, top_ids, logp, t_tail, t)
                rows[t][name].append(kl_per_position(s_logq, t_logp, "forward"))
    table = {}
    for t, by_kind in rows.items():
        table[f"{t:g}"] = {name: {"mean": float(torch.cat(v).mean()), "max": float(torch.cat(v).max())}
                           for name, v in by_kind.items()}
    command = "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:]))
    result = {"command": command, "date": time.strftime("%Y-%m-%d"), "machine": machine("cpu"),
              "settings": {k: v for k, v in vars(opts).items() if k != "results"},
              "positions": int(ids.size), "kl_teacher_as_student": table}
    out = Path(opts.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"tempered_tail_{opts.tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# The teacher's tail at temperature T ({opts.tag})", "",
          f"`{command}` on {result['date']}, {json.dumps(result['machine'])}", "",
          f"KL(cached teacher ‖ teacher) at T, the real teacher as its own student, top-{opts.top_k} "
          f"+ tail stored in fp16, over {result['positions']} held-out positions of `{opts.data}`: "
          "the error of the target alone (mean / worst position, nats).", "",
          "| T | tail as one token (before) | exact tempered tail | uniform approximation |",
          "|---|---|---|---|"]
    for t, kinds in table.items():
        md.append(f"| {t} | " + " | ".join(f"{kinds[n]['mean']:.3g} / {kinds[n]['max']:.3g}"
                                            for n in ("one_token", "exact", "uniform")) + " |")
    (out / f"tempered_tail_{opts.tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
