"""Families whose logits are not ``head(final hidden)``: Gemma-2 softcaps them, Cohere multiplies
them by ``logit_scale``, Granite divides them by ``logits_scaling``. Every path that builds logits
from a hidden state (cache builder, exact cache, the training and evaluation losses, online teacher,
evaluate) must give ``model(ids).logits``; a post-processing unidistill does not know is refused.

The models are tiny and random, built from their config classes (nothing downloaded). Their heads
are scaled up so the logits reach a few units: at the random init's ~0.1 a softcap would hardly
bend them.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from unidistill.cache_builder.build import build_cache
from unidistill.cache_builder.capture import TeacherRunner
from unidistill.cache_builder.config import BuildConfig
from unidistill.errors import CacheMismatchError
from unidistill.evaluate import evaluate
from unidistill.model_logits import (
    LogitTransform,
    OutputHead,
    LogitTransformError,
    check_logit_transform,
    head_logits,
)
from unidistill.models.targets import TeacherTargets
from unidistill.storage import CacheReader
from unidistill.storage.head import read_logit_transform
from unidistill.storage.manifest import MANIFEST_KEY
from unidistill.trainer.losses import LossConfig, logit_loss, logit_sums, next_token_labels
from unidistill.trainer.online_teacher import OnlineTeacher
from unidistill.trainer.run import distill_from_cache

from .conftest import args_for, train_losses

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
             eos_token_id=1, bos_token_id=2, pad_token_id=0)
# model_type -> (config class, model class, family-specific config, what from_config must give)
FAMILIES = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=8, final_logit_softcapping=3.0),
               LogitTransform(softcap=3.0)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(head_dim=8, final_logit_softcapping=3.0), LogitTransform(softcap=3.0)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.5), LogitTransform(scale=0.5)),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(logit_scale=0.5), LogitTransform(scale=0.5)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=4.0),
                LogitTransform(scale=0.25)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM",
                   dict(logits_scaling=4.0, num_local_experts=2, num_experts_per_tok=1),
                   LogitTransform(scale=0.25)),
}
# the families the cache / trainer / evaluate tests run on: a softcap, a multiplier, a divisor
CACHED = ("gemma2", "cohere", "granite")


def make_model(kind: str, vocab_size: int, seed: int = 0, head_gain: float = 40.0):
    import transformers

    config_cls, model_cls, extra, _ = FAMILIES[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(vocab_size=vocab_size, **SMALL, **extra)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_gain)  # logits of a few units, not ~0.1
    return model


def own_logits(model, ids) -> torch.Tensor:
    """The model's own logits (B, L, V) fp32: the reference everything is held to."""
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids, dtype=np.int64))).logits.float()


def random_ids(n=2, length=12, vocab=160, seed=0):
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tiny_teacher_dir):
    """kind -> a saved HF folder of that family with the test tokenizer."""
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    dirs = {}
    for kind in CACHED:
        path = tmp_path_factory.mktemp(kind)
        make_model(kind, len(tok)).save_pretrained(path)
        tok.save_pretrained(path)
        dirs[kind] = path
    return dirs


def build(out, teacher_dir, text_file, **kw):
    cfg = dict(teacher=str(teacher_dir), data=str(text_file), out=str(out), seq_len=32,
               max_sequences=8, batch_size=4, shard_size=4, device="cpu", layers="1", top_k=16)
    cfg.update(kw)
    return build_cache(BuildConfig(**cfg), progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def exact_caches(tmp_path_factory, family_dirs, text_file):
    root = tmp_path_factory.mktemp("exact")
    for kind, path in family_dirs.items():
        build(root / kind, path, text_file, logits="exact")
    return {kind: root / kind for kind in family_dirs}


# -- the transform itself ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_transform_from_config_is_what_the_forward_does(kind):
    model = make_model(kind, 160)
    transform = LogitTransform.from_config(model.config)
    assert transform == FAMILIES[kind][3]
    ids = random_ids()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        plain = model.get_output_embeddings()(out.hidden_states[-1]).float()
    torch.testing.assert_close(transform.apply(plain), out.logits, atol=1e-5, rtol=1e-5)
    assert (plain - out.logits).abs().max() > 0.5          # the transform matters on this model
    assert check_logit_transform(model, ids) == transform


def test_a_plain_head_and_a_softcap_of_none_are_the_identity(tiny_teacher_dir):
    llama = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    assert LogitTransform.from_config(llama.config).is_identity
    gemma = make_model("gemma2", 160)
    gemma.config.final_logit_softcapping = None
    assert LogitTransform.from_config(gemma.config).is_identity
    check_logit_transform(gemma, random_ids())
    z = torch.randn(3, 5)
    assert LogitTransform().apply(z) is z
    assert LogitTransform.from_dict(LogitTransform(0.25, 3.0).to_dict()) == LogitTransform(0.25, 3.0)


def test_the_check_is_dtype_aware_in_bfloat16():
    """bf16 rounding of the model's own cap passes; a missing transform does not."""
    model = make_model("gemma2", 160).to(torch.bfloat16)
    ids = random_ids()
    check_logit_transform(model, ids)
    with pytest.raises(LogitTransformError, match=r"model_type 'gemma2'.*bfloat16"):
        check_logit_transform(model, ids, LogitTransform())


# -- phase one: top-k and exact caches ---------------------------------------------------------
@pytest.mark.parametrize("kind", CACHED)
def test_a_topk_cache_holds_the_teachers_own_log_probs(tmp_path, family_dirs, text_file, kind):
    build(tmp_path / "c", family_dirs[kind], text_file, logits="topk")
    reader = CacheReader(tmp_path / "c")
    model = AutoModelForCausalLM.from_pretrained(family_dirs[kind]).eval()
    for i in (0, len(reader) - 1):
        seq = reader.read(i, layers=[])
        log_p = torch.log_softmax(own_logits(model, seq["input_ids"][None])[0], -1)    # (L, V)
        top = log_p.topk(16, dim=-1)
        ids = torch.from_numpy(seq["teacher_ids"].astype(np.int64))
        # ties aside, the same ids in the same order; the values in fp16
        torch.testing.assert_close(log_p.gather(-1, ids), top.values, atol=2e-3, rtol=0)
        torch.testing.assert_close(torch.from_numpy(seq["teacher_logp"]).float(), top.values,
                                   atol=4e-3, rtol=0)
        tail = log_p.scatter(-1, top.indices, float("-inf")).logsumexp(-1)                # (L,)
        torch.testing.assert_close(torch.from_numpy(seq["teacher_log_tail"]).float(), tail,
                                   atol=4e-3, rtol=1e-3)
    assert reader.manifest["settings"]["teacher"]["logit_transform"] == FAMILIES[kind][3].to_dict()


@pytest.mark.parametrize("kind", CACHED)
def test_the_runner_builds_the_teachers_own_logits_for_topk_and_sampling(family_dirs, kind):
    model = AutoModelForCausalLM.from_pretrained(family_dirs[kind]).eval()
    runner = TeacherRunner(model, [], 4, mode="sampled")
    ids = random_ids()
    final, _ = runner.forward(ids)
    torch.testing.assert_close(runner.logits(final.reshape(-1, final.shape[-1])),
                               own_logits(model, ids).reshape(-1, model.config.vocab_size),
                               atol=1e-5, rtol=1e-5)
    runner.close()


@pytest.mark.parametrize("kind", CACHED)
def test_an_exact_cache_rebuilds_the_teachers_own_logits(family_dirs, exact_caches, kind):
    reader = CacheReader(exact_caches[kind])
    weight, bias, transform = reader.head()
    assert transform == FAMILIES[kind][3]
    model = AutoModelForCausalLM.from_pretrained(family_dirs[kind]).eval()
    seq = reader.read(0, layers=[])
    rebuilt = head_logits(torch.from_numpy(seq["teacher_final_hidden"]), weight, bias, transform)
    want = own_logits(model, seq["input_ids"][None])[0]                                 # (L, V)
    torch.testing.assert_close(torch.log_softmax(rebuilt, -1), torch.log_softmax(want, -1),
                               atol=1e-2, rtol=0)                         # only fp16 of the state


def test_an_exact_cache_without_a_recorded_transform(tmp_path, family_dirs, exact_caches):
    """Caches built before the record: identity for plain-head architectures, refused otherwise,
    before a training run writes anything."""
    def manifest(architecture):
        return {"settings": {"teacher": {"architecture": architecture}}}

    assert read_logit_transform(manifest("LlamaForCausalLM"), "c").is_identity
    with pytest.raises(CacheMismatchError, match=r"Gemma2ForCausalLM.*cache-build"):
        read_logit_transform(manifest("Gemma2ForCausalLM"), "c")

    legacy = tmp_path / "legacy"
    shutil.copytree(exact_caches["gemma2"], legacy)
    meta = json.loads((legacy / "zarr.json").read_text())
    del meta["attributes"][MANIFEST_KEY]["settings"]["teacher"]["logit_transform"]
    (legacy / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(CacheMismatchError, match="before unidistill recorded"):
        CacheReader(legacy).head()
    with pytest.raises(CacheMismatchError, match="before unidistill recorded"):
        distill_from_cache(legacy, str(family_dirs["gemma2"]), args_for(tmp_path / "run", gamma=0.0))
    assert not (tmp_path / "run").exists()


# -- phase two: the losses on the student side ---------------------------------------------------
def _reference_losses(student, teacher, ids):
    """CE and forward KL (means over positions) from the models' own full logits."""
    z = student(ids).logits.float()                                                    # (B, L, V)
    ce = F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), ids[:, 1:].reshape(-1))
    with torch.no_grad():
        log_p = torch.log_softmax(teacher(ids).logits.float(), -1)
    kl = (log_p.exp() * (log_p - torch.log_softmax(z, -1))).sum(-1).mean()
    return ce, kl


@pytest.mark.parametrize("kind", ["gemma2", "granite"])
def test_the_logit_loss_of_a_family_student_matches_autograd_through_the_model(kind):
    """CE and KL to an exact teacher of the same family, and their gradients w.r.t. every student
    parameter, equal those of the models' own logits (through tanh for the softcap); the
    evaluation sums agree."""
    student, teacher = make_model(kind, 160, seed=0), make_model(kind, 160, seed=1)
    reference = make_model(kind, 160, seed=0)
    ids = random_ids(length=13)
    labels = next_token_labels(ids)
    with torch.no_grad():
        t_final = teacher(ids, output_hidden_states=True).hidden_states[-1]
    exact = TeacherTargets(final_hidden=t_final, head=OutputHead.of(teacher))
    cfg = LossConfig(alpha=0.7, beta=0.3, temperature=1.0, chunk_size=5)

    hidden = student(ids, output_hidden_states=True).hidden_states[-1]
    loss, ce, kl = logit_loss(hidden, OutputHead.of(student), labels, exact, cfg)
    sums = logit_sums(hidden, OutputHead.of(student), labels, exact, cfg)
    loss.backward()
    ref_ce, ref_kl = _reference_losses(reference, teacher, ids)
    (0.7 * ref_ce + 0.3 * ref_kl).backward()

    torch.testing.assert_close(ce.detach(), ref_ce.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kl.detach(), ref_kl.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sums[0] / sums[1], ref_ce.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sums[2] / sums[3], ref_kl.detach(), atol=1e-5, rtol=1e-5)
    ref_params = dict(reference.named_parameters())
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["gemma2", "cohere"])
def test_distilling_a_family_student_from_its_own_exact_cache(tmp_path, family_dirs, exact_caches,
                                                              kind):
    """The teacher as its own student: the logged CE is the one of its own logits over the whole
    cache (one batch holds all of it) and the KL to its exact cache is ~0 (fp16 state only)."""
    reader = CacheReader(exact_caches[kind])
    args = args_for(tmp_path / "run", max_steps=1, per_device_train_batch_size=len(reader),
                    save_strategy="no", alpha=1.0, beta=1.0, gamma=0.0, kd_temperature=1.0,
                    learning_rate=0.0)
    trainer = distill_from_cache(exact_caches[kind], str(family_dirs[kind]), args)
    (_, _, ce, kl, _), = train_losses(trainer)
    ids = np.stack([reader.read(i, layers=[], logits=False)["input_ids"] for i in range(len(reader))])
    z = own_logits(AutoModelForCausalLM.from_pretrained(family_dirs[kind]).eval(), ids)
    ref_ce = F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]),
                             torch.from_numpy(ids[:, 1:].astype(np.int64)).reshape(-1))
    assert ce == pytest.approx(float(ref_ce), rel=1e-4)
    assert kl == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("kind", ["gemma2", "granite"])
def test_the_online_teacher_gives_its_own_logits(family_dirs, kind):
    model = AutoModelForCausalLM.from_pretrained(family_dirs[kind]).eval()
    ids = random_ids()
    log_p = torch.log_softmax(own_logits(model, ids), -1)                              # (B, L, V)
    targets = OnlineTeacher(model, kd_top_k=8)(ids)
    torch.testing.assert_close(targets.logp, log_p.topk(8, -1).values, atol=1e-5, rtol=0)
    full = OnlineTeacher(model, kd_top_k=None)(ids)
    rebuilt = full.head.logits(full.final_hidden)
    torch.testing.assert_close(torch.log_softmax(rebuilt, -1), log_p, atol=1e-5, rtol=0)


# -- evaluate ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", CACHED)
def test_evaluate_scores_a_family_model_by_its_own_logits(family_dirs, exact_caches, text_file, kind):
    from unidistill.text.data import iter_documents, pack_documents

    model_dir = family_dirs[kind]
    result = evaluate(str(model_dir), data=str(text_file), cache=str(exact_caches[kind]), seq_len=24, split="all",
                      max_sequences=4, batch_size=2, device="cpu", progress=False)
    ids = pack_documents(iter_documents(str(text_file), split="all"), AutoTokenizer.from_pretrained(model_dir), 24, 4)
    z = own_logits(AutoModelForCausalLM.from_pretrained(model_dir).eval(), ids)
    ref = F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]),
                          torch.from_numpy(ids[:, 1:].astype(np.int64)).reshape(-1))
    assert result.nll == pytest.approx(float(ref), rel=1e-5)
    # against its own exact cache: the teacher's rebuilt logits are its own too
    assert result.kl_to_teacher == pytest.approx(0.0, abs=1e-3)
    assert result.top1_agreement == pytest.approx(1.0)


# -- an unknown post-processing ------------------------------------------------------------------
def _patch_llama_logits(monkeypatch):
    """Llama with a post-processing unidistill cannot know: logits * 1.5 + a per-id bias."""
    forward = LlamaForCausalLM.forward

    def patched(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out.logits = out.logits * 1.5 + torch.linspace(0, 1, out.logits.shape[-1])
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", patched)


def test_an_unknown_post_processing_is_refused_everywhere(monkeypatch, tmp_path, tiny_teacher_dir,
                                                          student_dir, cache, text_file):
    _patch_llama_logits(monkeypatch)
    message = r"model_type 'llama'.*max \|difference\| [0-9.]+.*LogitTransform\.from_config"
    with pytest.raises(LogitTransformError, match="the teacher.*" + message):
        build(tmp_path / "c", tiny_teacher_dir, text_file)
    assert not (tmp_path / "c").exists()                 # refused before anything was written
    with pytest.raises(LogitTransformError, match="the student.*" + message):
        distill_from_cache(cache, str(student_dir), args_for(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    with pytest.raises(LogitTransformError, match="the teacher.*" + message):
        OnlineTeacher(teacher, kd_top_k=4)(random_ids())
    with pytest.raises(LogitTransformError, match="the evaluated model.*" + message):
        evaluate(str(student_dir), data=str(text_file), seq_len=24, max_sequences=2, device="cpu",
                 progress=False)
