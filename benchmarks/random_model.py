"""Write a randomly initialised Llama-style causal LM folder that unidistill loads as ``--teacher``.

For measuring speed and memory where the real teacher cannot travel (the GPU machine has no
SmolLM2 GGUF) or does not exist (a 262 K vocabulary): the folder holds ``config.json``,
``model.safetensors`` and a fast tokenizer whose vocabulary has exactly ``vocab_size`` entries,
so it is a complete Hugging Face model folder for ``cache-build``, ``prune`` and the benchmarks.

Usage:
    python benchmarks/random_model.py --preset smollm2-135m --out /tmp/teacher-135m
    python benchmarks/random_model.py --preset vocab262k --out /tmp/teacher-262k
    python benchmarks/random_model.py --preset tiny --vocab-size 8192 --out /tmp/t   # tests

The tokenizer is a byte-level BPE built offline with the ``tokenizers`` library: merges learned
from CPython's reference topics (``pydoc_data.topics``, in every Python; about 4 characters a
token on that text, like SmolLM2's), every byte a token of its own (nothing is ever unknown),
then padded with unreachable synthetic tokens to exactly ``vocab_size`` entries. Ids are a seeded
random permutation of ``0..V-1`` (the end-of-text token keeps id 0), so real text tokenizes to
ids spread over the whole vocabulary, and the embedding rows it reads are spread like a real
large vocabulary's.

Weights are random (``initializer_range``, seeded): throughput and memory are those of the real
shape, but the teacher's distribution is close to uniform, so cache bytes/token (compression of
log-probs and hidden states) and losses are not representative of a trained teacher.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PRESETS = {
    # SmolLM2-135M(-Instruct): LlamaForCausalLM, what builtin:smollm2 is
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5),
    # a Gemma-3-sized vocabulary on a small body (Qwen3-0.6B's width): the head is most of the model
    "vocab262k": dict(vocab_size=262144, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True,
                      max_position_embeddings=8192, rope_theta=1000000.0, rms_norm_eps=1e-6),
    # seconds on a CPU: tests and dry runs
    "tiny": dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                 max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5),
}
PRESETS["vocab152k"] = {**PRESETS["vocab262k"], "vocab_size": 151936}  # a Qwen-sized vocabulary, same body
EOS = "<|endoftext|>"
MERGES_CORPUS_TOKENS = 16384  # BPE vocabulary learned from the text (bytes + merges), at most


def corpus() -> list[str]:
    """CPython's reference topics: the text every Python ships (and builtin:pydoc_topics)."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def build_tokenizer(vocab_size: int, seed: int = 0, learned: int = MERGES_CORPUS_TOKENS):
    """A byte-level BPE ``tokenizers.Tokenizer`` with exactly ``vocab_size`` ids (see module doc)."""
    import numpy as np
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise SystemExit(f"vocab_size {vocab_size} is too small: a byte-level BPE needs 256 byte "
                         "tokens and the end-of-text token")
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, learned), special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    base.train_from_iterator(corpus(), trainer=trainer)
    model = json.loads(base.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if t != EOS]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    n_pad = vocab_size - 1 - len(tokens)
    tokens += [f"<|synthetic_{i:06d}|>" for i in range(n_pad)]  # no merge makes them: unreachable
    ids = np.random.default_rng(seed).permutation(np.arange(1, vocab_size))
    vocab = {EOS: 0, **{t: int(i) for t, i in zip(tokens, ids)}}
    assert len(vocab) == vocab_size and sorted(vocab.values()) == list(range(vocab_size))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return tok, len(model["vocab"])


def write_model(out: Path, preset: str, overrides: dict, seed: int = 0, dtype: str = "bfloat16",
                initializer_range: float = 0.02, init_device: str = "cpu", log=print) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    shape = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    t0 = time.perf_counter()
    tok, learned = build_tokenizer(shape["vocab_size"], seed)
    # no model_max_length: packing tokenizes whole documents, and the limit only adds warnings
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)
    if len(fast) != shape["vocab_size"]:
        raise SystemExit(f"tokenizer has {len(fast)} ids, the model {shape['vocab_size']}")
    config = LlamaConfig(**shape, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                         initializer_range=initializer_range, attention_bias=False, mlp_bias=False,
                         hidden_act="silu")
    torch.manual_seed(seed)
    try:
        with torch.device(init_device):  # a GPU draws the random weights in a blink; other values
            model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    except (RuntimeError, AssertionError) as e:  # no such device: slower, same shape
        log(f"[random_model] init on {init_device} failed ({type(e).__name__}: {e}); drawing on the CPU")
        init_device = "cpu"
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    info = {"preset": preset, "shape": shape, "seed": seed, "init_device": init_device, "dtype": dtype,
            "initializer_range": initializer_range,
            "parameters": sum(p.numel() for p in model.parameters()),
            "tokenizer": {"vocab_size": len(fast), "learned_bpe_tokens": learned,
                          "synthetic_padding": shape["vocab_size"] - learned},
            "seconds": round(time.perf_counter() - t0, 1)}
    (out / "random_model.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"[random_model] {out}: {json.dumps(info)}")
    return info


def check_folder(out: Path, log=print) -> dict:
    """Load the folder as unidistill does and tokenize the reference topics: ids spread over V."""
    import numpy as np

    from unidistill.models.loading import load_config, load_tokenizer, resolve_model_source

    source = resolve_model_source(str(out))
    tokenizer, config = load_tokenizer(source), load_config(source)
    assert len(tokenizer) == config.vocab_size, (len(tokenizer), config.vocab_size)
    text = "\n".join(corpus())
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert tokenizer.decode(ids[:2000].tolist()) == tokenizer.decode(
        tokenizer(tokenizer.decode(ids[:2000].tolist()), add_special_tokens=False)["input_ids"])
    V = config.vocab_size
    stats = {"characters": len(text), "tokens": int(ids.size), "chars_per_token": round(len(text) / ids.size, 2),
             "distinct_ids": int(np.unique(ids).size), "min_id": int(ids.min()), "max_id": int(ids.max()),
             "ids_in_each_quarter_of_V": [int(((ids >= q * V // 4) & (ids < (q + 1) * V // 4)).sum())
                                          for q in range(4)],
             "eos_token_id": tokenizer.eos_token_id}
    if stats["distinct_ids"] < 100 or min(stats["ids_in_each_quarter_of_V"]) == 0:
        raise SystemExit(f"tokenizer of {out} does not spread text over the vocabulary: {stats}")
    log(f"[random_model] check {out}: {json.dumps(stats)}")
    return stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="smollm2-135m")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--intermediate-size", type=int)
    p.add_argument("--layers", type=int, dest="num_hidden_layers")
    p.add_argument("--heads", type=int, dest="num_attention_heads")
    p.add_argument("--kv-heads", type=int, dest="num_key_value_heads")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                   help="dtype of the saved weights (loaders cast to what they ask for)")
    p.add_argument("--initializer-range", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-device", default="cpu",
                   help="where the weights are drawn (cuda: seconds faster for large models; the "
                        "values differ from a CPU draw with the same seed)")
    p.add_argument("--no-check", action="store_true", help="skip loading and tokenizing it back")
    args = p.parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                "num_hidden_layers", "num_attention_heads",
                                                "num_key_value_heads")}
    out = Path(args.out)
    write_model(out, args.preset, overrides, args.seed, args.dtype, args.initializer_range,
                args.init_device, log=lambda m: print(m, file=sys.stderr))
    if not args.no_check:
        check_folder(out, log=lambda m: print(m, file=sys.stderr))


if __name__ == "__main__":
    main()
