"""Wiring of one ``distill-from-cache`` run: checks first, then the Trainer.

Every check that can fail on bad input runs before the student is trained: cache complete,
tokenizer equal to the cache's (pad id aside), head covering its vocabulary, layer map valid and
its teacher layers cached, k within the stored k; several caches agree with one another
(:mod:`.caches`). The run folder, and every checkpoint in it, records the command, the settings
and the caches' paths and fingerprints in ``unidistill_run.json`` (:mod:`.run_record`); a resume
from a checkpoint trained on other caches, or on the same in another order, is refused.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import default_collate

from unidistill import __version__
from unidistill.errors import CacheMismatchError, ConfigError
from unidistill.model_logits import OutputHead, check_logit_transform
from unidistill.models.layer_map import (
    PROVENANCE_KEY, check_layers_in_cache, parse_layer_map, provenance_from_config, provenance_record,
)
from unidistill.models.loading import load_student
from unidistill.models.packing import check_segment_isolation
from unidistill.storage import CacheReader
from unidistill.storage.files import utc_timestamp
from unidistill.trainer.arguments import DistillationArguments
from unidistill.trainer.caches import ConcatCacheDataset, check_caches_agree
from unidistill.trainer.dataset import (
    CacheDataset, check_student_matches_cache, check_student_template, sample_document_ids,
    sample_input_ids,
)
from unidistill.trainer.losses.divergences import teacher_head_for
from unidistill.trainer.online_teacher import OnlineTeacher
from unidistill.trainer.projectors import HiddenProjectors
from unidistill.trainer.run_record import (
    cache_entries, check_checkpoint_caches, resolve_checkpoint, write_run_record,
)
from unidistill.trainer.student import StudentWithProjectors

logger = logging.getLogger(__name__)

@dataclass
class DistillPlan:
    readers: list[CacheReader]  # the caches, in training order; they agree (trainer.caches)
    layer_map: dict[int, int]
    hidden_pairs: dict[int, int]
    d_student: int
    d_teacher: int

    @property
    def reader(self) -> CacheReader:
        """The first cache: the reference the others were checked against."""
        return self.readers[0]


def cache_list(cache) -> list:
    """``cache`` as a list: one path (str or path-like) or several (a list or tuple)."""
    caches = list(cache) if isinstance(cache, (list, tuple)) else [cache]
    if not caches:
        raise ConfigError("no cache to train on: give --cache (repeatable), or pass "
                          "distill_from_cache a cache path or a list of them")
    return caches


def select_hidden_pairs(layer_map: dict[int, int], align: str, cached_layers) -> dict[int, int]:
    """The (student block -> teacher layer) pairs that get a hidden-state loss."""
    cached = set(cached_layers)
    if align == "all":
        check_layers_in_cache(layer_map, cached)
        return dict(layer_map)
    if align == "cached":
        pairs = {i: j for i, j in layer_map.items() if j in cached}
        if not pairs:
            raise CacheMismatchError(f"none of the mapped teacher layers {sorted(set(layer_map.values()))} "
                                     f"is in the cache, which holds layers {sorted(cached)}; choose "
                                     "another --layer-map, set --gamma 0, or rebuild the cache with "
                                     "--layers including them")
        return pairs
    try:
        wanted = [int(x) for x in align.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--align-layers {align!r} is not 'cached', 'all' or a list of student "
                          "blocks like 4,8,12") from None
    missing = [i for i in wanted if i not in layer_map]
    if missing:
        raise ConfigError(f"student blocks {missing} are not in the layer map (which maps "
                          f"{sorted(layer_map)}); valid blocks are 1..{max(layer_map)}")
    pairs = {i: layer_map[i] for i in wanted}
    check_layers_in_cache(pairs, cached)
    return pairs


def check_logit_settings(reader: CacheReader, args: DistillationArguments) -> None:
    """Refuse a logit loss the cache's representation cannot feed, up front (its codec's
    ``check_training``): a sampled cache estimates the teacher at the temperature it was sampled
    at, forward KL only; an exact cache must say how its teacher's logits follow from the head."""
    if args.beta > 0:
        reader.layout.logit_codec.check_training(reader.manifest, reader.root,
                                                 temperature=args.kd_temperature,
                                                 kl_direction=args.kl_direction)


def plan_run(cache, tokenizer, student_config, args: DistillationArguments) -> DistillPlan:
    """The checks of a run's caches against the student and the arguments, and its layer plan;
    ``cache``: one cache or a list (each checked, and checked to agree with the first)."""
    readers = [CacheReader(c, local_dir=args.cache_local_dir) for c in cache_list(cache)]
    reader = readers[0]
    check_student_matches_cache(reader, tokenizer, student_config,
                                kl_direction=args.kl_direction if args.beta > 0 else None,
                                kd_top_k=args.kd_top_k)
    for each in readers:
        check_student_template(each, tokenizer)
        check_logit_settings(each, args)
    approximated = [each.check_request((), args.kd_top_k, args.kd_temperature if args.beta > 0 else 1.0,
                                       args.tail_approximation) for each in readers]
    if any(approximated):
        logger.warning("KD at T = %g uses the uniform-tail approximation: cache %s stores the exact "
                       "tempered tail for T in %s only. Its error on a real teacher is in the "
                       "README ('Temperatures')", args.kd_temperature, reader.root,
                       [1.0, *reader.layout.tail_temperatures])
    teacher = reader.manifest["settings"]["teacher"]
    n_s, n_t = student_config.num_hidden_layers, teacher["n_layers"]
    layer_map = parse_layer_map(args.layer_map, n_s, n_t, provenance=provenance_from_config(student_config))
    pairs = select_hidden_pairs(layer_map, args.align_layers, reader.layers) if args.gamma > 0 else {}
    check_caches_agree(readers, kd_top_k=args.kd_top_k, teacher_layers=set(pairs.values()),
                       reads_hidden=bool(pairs) or reader.layout.logit_codec.has_head)
    return DistillPlan(readers, layer_map, pairs, student_config.hidden_size, teacher["hidden_size"])


def cache_dataset(plan: DistillPlan, args: DistillationArguments, online: bool):
    """The training data: the cache's :class:`CacheDataset`, or the caches' concatenation in the
    order given (:class:`ConcatCacheDataset`). With an ``online`` teacher only the ids are read."""
    parts = [CacheDataset(reader, layers=() if online else sorted(set(plan.hidden_pairs.values())),
                          kd_top_k=args.kd_top_k, logits=args.beta > 0 and not online,
                          temperature=args.kd_temperature,
                          tail_approximation=args.tail_approximation)
             for reader in plan.readers]
    return parts[0] if len(parts) == 1 else ConcatCacheDataset(parts)


def run_caches(cache, plan: DistillPlan) -> list[tuple[str, str]]:
    """``[(path, fingerprint)]`` of the run's caches, in training order."""
    return [(str(path), reader.manifest["fingerprint"])
            for path, reader in zip(cache_list(cache), plan.readers)]


def make_run_record(args: DistillationArguments, plan: DistillPlan, student: str, cache,
                    resumed_from: str | None = None) -> dict:
    return {
        "unidistill_version": __version__,
        "command": sys.argv,
        "started_at": utc_timestamp(),
        "student": str(student),
        **cache_entries(run_caches(cache, plan)),
        "resumed_from": resumed_from,
        "layer_map": {str(i): j for i, j in plan.layer_map.items()},
        "hidden_pairs": {str(i): j for i, j in plan.hidden_pairs.items()},
        "arguments": json.loads(args.to_json_string()),
        "processes": args.world_size,  # the batch per optimizer step is processes x per-device x GA
    }


def projector_init(requested: str, config, d_student: int, d_teacher: int
                   ) -> tuple[str, list[int] | None]:
    """The projector init to use and, for ``channels``, the teacher channel of each student one.

    ``auto`` picks ``channels`` when the student config records the ``hidden_channels`` a
    width-pruning step kept from this teacher's width, and ``xavier`` otherwise.
    """
    channels = provenance_record(config).get("hidden_channels")
    fits = channels is not None and len(channels) == d_student and max(channels) < d_teacher
    if requested == "auto":
        return ("channels", list(channels)) if fits else ("xavier", None)
    if requested != "channels":
        return requested, None
    if not fits:
        found = "none" if channels is None else f"{len(channels)} channels up to {max(channels, default=None)}"
        raise ConfigError(f"--projector-init channels needs the student config to record which of "
                          f"the teacher's {d_teacher} channels its {d_student} came from "
                          f"({PROVENANCE_KEY}['hidden_channels']); found {found}. Make the student "
                          f"with `unidistill prune --hidden-keep`, or use --projector-init xavier")
    return "channels", list(channels)


def student_head_rows(model, online_teacher: OnlineTeacher | None, online_top_k) -> int:
    """The rows of the student's head (its vocabulary, padded or not); the online
    full-vocabulary baseline, whose teacher logits are not padded, needs them equal to the
    teacher's."""
    rows = model.get_output_embeddings().weight.shape[0]
    if online_teacher is not None and online_top_k is None and \
            rows != online_teacher.head_weight.shape[0]:
        raise ConfigError(f"the online full-vocabulary baseline needs the student's head "
                          f"({rows} rows) to match the teacher's "
                          f"({online_teacher.head_weight.shape[0]}); use an online top-k teacher "
                          "(online_top_k=K) or distill from the cache")
    return rows


def check_start_up(reader: CacheReader, model, online_teacher: OnlineTeacher | None) -> None:
    """Before training: the student's (and online teacher's) logits are their head + known
    transform, and on a packed cache both keep the documents of a row apart."""
    sample = sample_input_ids(reader)
    check_logit_transform(model, sample, role="student")  # its logits as the fused loss builds them
    documents = sample_document_ids(reader)
    if documents is not None:
        check_segment_isolation(model, sample[:1], documents, role="student")
    if online_teacher is not None:
        online_teacher.check_logits(sample)
        if documents is not None:
            check_segment_isolation(online_teacher.model, sample[:1], documents, role="online teacher")


def distill_from_cache(cache, student: str, args: DistillationArguments, *,
                       resume_from_checkpoint=None, teacher_model=None, online_top_k=None,
                       callbacks=None):
    """Train ``student`` on the cache; saves the final model + projectors to ``args.output_dir``.

    ``cache``: a cache path, or a list of them: the run trains on their concatenation, in the
    order given (one epoch sees every sequence of each once), after checking that they agree
    (:mod:`~unidistill.trainer.caches`).

    With ``teacher_model`` (a loaded causal LM), this is the online baseline instead: only the
    token ids come from the cache (same data, same order), and the targets come from the live
    teacher, full-vocabulary (``online_top_k=None``) or top-k. ``callbacks`` are extra
    ``TrainerCallback`` objects.
    """
    from transformers import AutoConfig, AutoTokenizer, set_seed

    from unidistill.trainer.distill_trainer import UniversalDistillationTrainer

    tokenizer = AutoTokenizer.from_pretrained(student)
    config = AutoConfig.from_pretrained(student)
    plan = plan_run(cache, tokenizer, config, args)
    checkpoint = resolve_checkpoint(resume_from_checkpoint, args.output_dir)
    check_checkpoint_caches(checkpoint, run_caches(cache, plan))
    online_teacher = None
    if teacher_model is not None:
        online_teacher = OnlineTeacher(teacher_model.to(args.device),
                                       layers=sorted(set(plan.hidden_pairs.values())),
                                       kd_top_k=online_top_k, temperature=args.kd_temperature)
    dataset = cache_dataset(plan, args, online=online_teacher is not None)
    model = load_student(student, config)  # a GGUF teacher's leftover quantization_config dropped
    student_vocab = student_head_rows(model, online_teacher, online_top_k)
    check_start_up(plan.reader, model, online_teacher)
    set_seed(args.seed)  # projector initialisation is part of the run's reproducible state
    init, channels = projector_init(args.projector_init, config, plan.d_student, plan.d_teacher)
    projectors = HiddenProjectors(plan.hidden_pairs or plan.layer_map, plan.d_student, plan.d_teacher,
                                  force=args.force_projectors, init=init, channels=channels)
    if not plan.hidden_pairs:
        projectors.requires_grad_(False)  # no hidden loss: nothing to learn, still saved for the record
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    record = make_run_record(args, plan, student, cache, resumed_from=checkpoint)
    if args.should_save:  # the main process of a multi-process run (the one the Trainer saves from)
        write_run_record(args.output_dir, record)
    teacher_head = None
    if online_teacher is None and plan.reader.layout.logit_codec.has_head and args.beta > 0:
        teacher_head = teacher_head_for(OutputHead(*plan.reader.head(args.device)), student_vocab)
    trainer = UniversalDistillationTrainer(
        model=StudentWithProjectors(model, projectors), args=args, train_dataset=dataset,
        data_collator=default_collate, processing_class=tokenizer, hidden_pairs=plan.hidden_pairs,
        online_teacher=online_teacher, teacher_head=teacher_head, callbacks=callbacks,
        run_record=record)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    trainer.save_state()  # trainer_state.json: the loss history `unidistill report` plots
    return trainer
