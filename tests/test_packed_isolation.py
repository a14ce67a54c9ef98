"""A token's cached log-probs and hidden states are the same whether its document is packed with
others or alone (sdpa and eager), the leak the isolation check exists for is real, and a model
that ignores packed position ids is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import make_documents, write_jsonl
from unidistill.cache_builder import build as build_module
from unidistill.cache_builder.build import build_cache
from unidistill.cache_builder.config import BuildConfig
from unidistill.models import teacher as teacher_module
from unidistill.models.batch import TokenFields
from unidistill.models.packing import SegmentIsolationError, check_segment_isolation
from unidistill.storage import CacheReader

DOCS = make_documents(3, seed=5, min_words=3, max_words=6)


def _build(tmp_path, teacher, docs, name, packing):
    data = write_jsonl(tmp_path / f"{name}.jsonl", docs)
    out = tmp_path / name
    build_cache(BuildConfig(teacher=str(teacher), data=str(data), out=str(out), split="all",
                            seq_len=160, top_k=8, layers="2,4", packing=packing, batch_size=1,
                            shard_size=1, device="cpu"), progress=False, log=lambda m: None)
    return CacheReader(out)


def _segment(reader, ids):
    """(row, positions) of the segment whose ids are ``ids``."""
    for i in range(len(reader)):
        seq = reader.read(i)
        for doc in np.unique(seq["document_ids"]):
            at = np.flatnonzero(seq["document_ids"] == doc)
            if doc >= 0 and seq["input_ids"][at].tolist() == ids:
                return seq, at
    raise AssertionError("segment not found")


def _packed_vs_alone(tmp_path, teacher):
    packed = _build(tmp_path, teacher, DOCS, "packed", "documents")
    assert len(packed) == 1  # the three documents share one row
    docs = packed.read(0, layers=[], logits=False)["document_ids"]
    last = int(docs[docs >= 0][-1])  # the document placed last: it comes after the two others
    alone = _build(tmp_path, teacher, DOCS[last:last + 1], "alone", "none")
    seq_alone = alone.read(0)
    at_alone = np.flatnonzero(seq_alone["document_ids"] == 0)
    seq, at = _segment(packed, seq_alone["input_ids"][at_alone].tolist())
    assert at[0] > 0  # it follows other documents in its row
    return seq, at, seq_alone, at_alone


@pytest.fixture(params=["sdpa", "eager"])
def attention(request, monkeypatch):
    load = build_module.load_model

    def with_attention(*args, **kwargs):
        model = load(*args, **kwargs)
        model.set_attn_implementation(request.param)
        return model
    monkeypatch.setattr(build_module, "load_model", with_attention)
    return request.param


def test_cached_targets_of_a_document_packed_equal_it_alone(tmp_path, tiny_teacher_dir, attention):
    seq, at, alone, at_alone = _packed_vs_alone(tmp_path, tiny_teacher_dir)
    fp16_ulp = 2 ** -10
    a, b = seq["teacher_logp"][at].astype(np.float32), alone["teacher_logp"][at_alone].astype(np.float32)
    # sorted log-probs (top-k order may swap where two are tied within fp16 rounding)
    assert np.abs(a - b).max() <= 2 * fp16_ulp * np.abs(b).max() + 1e-4
    tail_a, tail_b = seq["teacher_log_tail"][at], alone["teacher_log_tail"][at_alone]
    assert np.abs(tail_a.astype(np.float32) - tail_b.astype(np.float32)).max() <= 2 * fp16_ulp * 8 + 1e-4
    for j in (2, 4):
        h, g = seq["hidden"][j][at].astype(np.float32), alone["hidden"][j][at_alone].astype(np.float32)
        assert np.abs(h - g).max() <= 2 * fp16_ulp * np.abs(g).max() + 1e-4, j


def test_without_use_cache_false_the_same_build_leaks_across_documents(tmp_path, tiny_teacher_dir,
                                                                       monkeypatch):
    """The negative control: the teacher forward given position ids but the config's use_cache."""
    real = teacher_module.segment_kwargs

    def leaky(model, document_ids):
        kwargs = real(model, document_ids)
        kwargs.pop("use_cache", None)
        return kwargs
    monkeypatch.setattr(teacher_module, "segment_kwargs", leaky)
    seq, at, alone, at_alone = _packed_vs_alone(tmp_path, tiny_teacher_dir)
    h, g = seq["hidden"][4][at].astype(np.float32), alone["hidden"][4][at_alone].astype(np.float32)
    assert np.abs(h - g).max() > 0.1 * np.abs(g).max()  # it sees the documents before it


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_the_student_in_training_mode_keeps_documents_apart(tiny_teacher_dir, impl):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).train()
    model.set_attn_implementation(impl)
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (2, 12))
    docs = torch.tensor([[0] * 5 + [1] * 4 + [-2] * 3, [2] * 7 + [3] * 5])
    tokens = TokenFields(ids, torch.ones_like(ids, dtype=torch.bool), docs)
    out = model(input_ids=ids, output_hidden_states=True, **tokens.forward_kwargs(model))
    final = out.hidden_states[-1]
    for row, (start, stop) in [(0, (5, 9)), (1, (7, 12)), (1, (0, 7))]:
        alone = model(input_ids=ids[row:row + 1, start:stop], output_hidden_states=True,
                      use_cache=False).hidden_states[-1]
        assert torch.allclose(final[row, start:stop], alone[0], atol=1e-5, rtol=1e-5)
    final.sum().backward()  # and backward runs
    assert model.model.embed_tokens.weight.grad is not None


def test_a_model_that_ignores_packed_position_ids_is_refused(tiny_teacher_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    ids = np.arange(3, 23)[None]
    docs = np.array([[0] * 8 + [1] * 12])
    check_segment_isolation(model, ids, docs, role="teacher")  # a plain Llama passes
    forward = model.forward

    def ignoring(*args, **kwargs):  # attends across: no per-segment positions, the default cache
        kwargs.pop("position_ids", None)
        kwargs.pop("use_cache", None)
        return forward(*args, **kwargs)
    model.forward = ignoring
    with pytest.raises(SegmentIsolationError, match=r"the teacher \(LlamaForCausalLM, model_type "
                                                    r"'llama', attention 'sdpa'\) does not keep "
                                                    r"packed documents apart: .* up to"):
        check_segment_isolation(model, ids, docs, role="teacher")
