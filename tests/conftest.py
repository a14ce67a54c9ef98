"""Shared fixtures: a tiny random Llama teacher with a real (trained-here) BPE tokenizer, and text.

Nothing is downloaded: the tokenizer is trained on the test text and the model is random.
"""

from __future__ import annotations

import json
import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from unidistill.cache_builder.build import build_cache  # noqa: E402  (after the offline switches)
from unidistill.cache_builder.config import BuildConfig  # noqa: E402
from unidistill.trainer.arguments import DistillationArguments  # noqa: E402

WORDS = ("the cache stores teacher log probs and hidden states for every token so that students "
         "can learn offline from one build shared by the whole team while layers map and project "
         "alpha beta gamma temperature python function class module import return value").split()


def make_documents(n_docs: int, seed: int = 0, min_words: int = 20, max_words: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) + "."
            for _ in range(n_docs)]


def write_jsonl(path, docs, field="text"):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({field: d, "id": len(d)}) + "\n")
    return path


def make_tokenizer(docs, vocab_size=160):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                   bos_token="<bos>")


def make_llama(vocab_size, *, hidden=32, layers=4, intermediate=64, heads=4, kv_heads=2, seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=512,
                      tie_word_embeddings=False, eos_token_id=1, bos_token_id=2, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def documents():
    return make_documents(120)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, documents):
    """A 4-block Llama (hidden 32) and its tokenizer, saved as a normal HF folder."""
    path = tmp_path_factory.mktemp("teacher")
    tok = make_tokenizer(documents)
    model = make_llama(len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory, documents):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", documents)


@pytest.fixture(scope="session")
def cache(tmp_path_factory, tiny_teacher_dir, text_file):
    out = tmp_path_factory.mktemp("cache") / "c"
    cfg = BuildConfig(teacher=str(tiny_teacher_dir), data=str(text_file), out=str(out), seq_len=32,
                      top_k=16, layers="all", max_sequences=16, batch_size=4, shard_size=4,
                      device="cpu")
    build_cache(cfg, progress=False, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, tiny_teacher_dir):
    """2 blocks of width 24 (teacher: 4 blocks of width 32), same tokenizer."""
    return save_small_student(tmp_path_factory.mktemp("student"), tiny_teacher_dir)


def save_small_student(path, teacher_dir):
    """2 blocks of width 24 with the teacher's tokenizer, saved in ``path``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    make_llama(len(tok), hidden=24, layers=2, intermediate=48, heads=4, kv_heads=2, seed=1).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def args_for(out, **kw):
    # linear schedule: the pinned reference runs (goldens) were recorded with it
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                lr_scheduler_type="linear",
                logging_steps=1, save_steps=2, save_strategy="steps", report_to=[], use_cpu=True,
                seed=0, data_seed=0, alpha=0.4, beta=0.4, gamma=0.2, kd_temperature=2.0,
                layer_map="uniform", hidden_loss="cosine", disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(kw)
    return DistillationArguments(**base)


def train_losses(trainer):
    return [(h["step"], h["loss"], h["loss_ce"], h["loss_kl"], h["loss_hidden"])
            for h in trainer.state.log_history if "loss_ce" in h]


# -- conversations: a ChatML teacher (BPE on the test words + <|im_start|>, <|im_end|>) ----------
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """n conversations of the test words: system, then 1-2 user/assistant exchanges."""
    rng = random.Random(seed)

    def words(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
    out = []
    for _ in range(n):
        turns = [{"role": "system", "content": words(2, 5)}]
        for _ in range(rng.randint(1, 2)):
            turns += [{"role": "user", "content": words(3, 10)},
                      {"role": "assistant", "content": words(2, 12)}]
        out.append(turns)
    return out


def make_chat_tokenizer(docs, vocab_size=420):
    tok = make_tokenizer(docs, vocab_size)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="session")
def conversations():
    return make_conversations(24)


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory, conversations):
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    with open(path, "w") as f:
        for c in conversations:
            f.write(json.dumps({"messages": c}) + "\n")
    return path


@pytest.fixture(scope="session")
def chat_teacher_dir(tmp_path_factory, documents):
    path = tmp_path_factory.mktemp("chat_teacher")
    tok = make_chat_tokenizer(documents)
    make_llama(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def chat_student_dir(tmp_path_factory, chat_teacher_dir):
    return save_small_student(tmp_path_factory.mktemp("chat_student"), chat_teacher_dir)


def chat_build_config(teacher, data, out, **kw) -> BuildConfig:
    base = dict(teacher=str(teacher), data=str(data), out=str(out), messages_field="messages",
                split="all", seq_len=128, top_k=8, layers="2,4", batch_size=2, shard_size=2,
                device="cpu")
    base.update(kw)
    return BuildConfig(**base)


@pytest.fixture(scope="session")
def chat_cache(tmp_path_factory, chat_teacher_dir, chat_file):
    """Conversations packed by best-fit decreasing (--packing documents, --train-on assistant)."""
    out = tmp_path_factory.mktemp("chat_cache") / "c"
    build_cache(chat_build_config(chat_teacher_dir, chat_file, out), progress=False, log=lambda m: None)
    return out


def load_benchmark(name: str):
    """A script of ``benchmarks/`` imported as a module (they are not a package)."""
    import importlib.util

    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
