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
