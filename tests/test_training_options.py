"""One source for the training options: distill-from-cache's options are generated from
DistillationArguments, and the command line, a --config file and ablate's runs build the same
arguments from the same input. Bad options are refused with what was given and what is valid."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from click.testing import CliRunner

import unidistill.trainer.run as trainer_run
from unidistill.ablate import ABLATION_COMMON, ablation_plan, check_variants, run_arguments
from unidistill.ablate.records import same_training, training_settings
from unidistill.cli import distill_from_cache_cmd, main
from unidistill.cli.training_options import ALIASES, COMMAND_OWN
from unidistill.errors import ConfigError
from unidistill.trainer.arguments import NOT_HONOURED, DistillationArguments

# one input, as field: value; every entry point below is given exactly this
INPUT = {"alpha": 0.3, "beta": 0.7, "gamma": 0.0, "kd_temperature": 2.0, "kd_top_k": 8,
         "kl_direction": "reverse", "hidden_loss": "nmse", "layer_map": "last", "max_steps": 7,
         "learning_rate": 1e-3, "lr_scheduler_type": "polynomial", "warmup_steps": 2,
         "optim": "adamw_torch", "weight_decay": 0.01, "adam_beta2": 0.98,
         "gradient_accumulation_steps": 2, "per_device_train_batch_size": 4, "seed": 3,
         "data_seed": 4, "use_cpu": True, "torch_compile": False, "dataloader_num_workers": 2,
         "dataloader_prefetch_factor": 3, "lr_scheduler_kwargs": {"power": 2.0},
         "logging_steps": 1, "save_strategy": "no", "report_to": "none"}


def _flags(values: dict) -> list[str]:
    """The command line of ``values``, with the command's own names (--temperature, --top-k)."""
    argv = []
    for name, value in values.items():
        flag = ALIASES.get(name, "--" + name.replace("_", "-"))
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag[2:]}")
        else:
            argv += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return argv


@pytest.fixture
def cli_arguments(monkeypatch):
    """Runs distill-from-cache up to the training call; returns the DistillationArguments built."""

    def run(*argv):
        got = []
        monkeypatch.setattr(trainer_run, "distill_from_cache",
                            lambda cache, student, args, **kw: got.append((args, kw)))
        result = CliRunner().invoke(main, ["distill-from-cache", "--cache", "c", "--student", "s", *argv])
        assert result.exit_code == 0, result.output
        return got[0]

    return run


def _same(a: DistillationArguments, b: DistillationArguments):
    assert a.to_dict() == b.to_dict()


def test_every_training_argument_is_an_option_with_its_default_and_help():
    params = {p.name: p for p in distill_from_cache_cmd.params}
    for field in dataclasses.fields(DistillationArguments):
        if field.name in COMMAND_OWN:
            assert field.name in params  # the command's own --resume-from-checkpoint
            continue
        option = params[field.name]
        assert f"--{field.name.replace('_', '-')}" in option.opts, field.name
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        assert option.default == getattr(default, "value", default), field.name
        assert option.help.startswith(field.metadata.get("help", "")), field.name
        assert option.hidden == (field.name in NOT_HONOURED), field.name


def test_every_entry_point_gives_the_same_arguments(tmp_path, cli_arguments):
    out = tmp_path / "run"
    from_cli, extra = cli_arguments("--out", str(out), *_flags(INPUT))
    assert extra == {"resume_from_checkpoint": None}
    assert (from_cli.kd_temperature, from_cli.kd_top_k, from_cli.optim.value) == (2.0, 8, "adamw_torch")
    assert from_cli.dataloader_prefetch_factor == 3 and from_cli.lr_scheduler_kwargs == {"power": 2.0}

    # a --config file, with the keys written in each accepted form, and a flag beside it
    config = {"temperature": 2.0, "kd-top-k": 8, "out": str(out),
              **{k: v for k, v in INPUT.items() if k not in ("kd_temperature", "kd_top_k", "seed")}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    from_config, _ = cli_arguments("--config", str(tmp_path / "run.yaml"), "--seed", "3")
    _same(from_config, from_cli)

    # ablate: its common options (ABLATION_COMMON included) and a --variant
    common = {k: v for k, v in INPUT.items() if k not in ("alpha", "beta", "layer_map")}
    variants, common = ablation_plan({"common": common}, ["run:alpha=0.3,beta=0.7,layer_map=last"])
    assert set(ABLATION_COMMON) <= set(INPUT)  # the input sets what ablate sets for its runs
    check_variants(common, variants)
    _same(run_arguments(out, variants[0], common), from_cli)

    # and the Python API
    _same(DistillationArguments(output_dir=str(out), **INPUT), from_cli)


def test_the_recipe_defaults_are_every_entry_points(tmp_path, cli_arguments):
    out = tmp_path / "run"
    from_cli, _ = cli_arguments("--out", str(out))
    plain = DistillationArguments(output_dir=str(out))
    _same(from_cli, plain)
    _same(run_arguments(out, {"name": "run"}, {}), plain)
    (tmp_path / "empty.yaml").write_text("out: " + str(out) + "\n")
    _same(cli_arguments("--config", str(tmp_path / "empty.yaml"))[0], plain)
    recipe = {"num_train_epochs": 1.0, "logging_steps": 10, "learning_rate": 3e-4,
              "lr_scheduler_type": "cosine", "alpha": 0.5, "beta": 0.5, "gamma": 0.0,
              "kd_temperature": 1.0, "report_to": [], "remove_unused_columns": False}
    assert {k: getattr(plain, k) for k in recipe} == recipe


def test_options_from_the_trainer_reach_the_arguments(tmp_path, cli_arguments):
    args, _ = cli_arguments("--out", str(tmp_path), "--torch-compile", "--dataloader-num-workers", "1",
                            "--dataloader-prefetch-factor", "5", "--report-to", "tensorboard,wandb",
                            "--fsdp-config", '{"min_num_params": 10}', "--no-dataloader-pin-memory",
                            "--include-num-input-tokens-seen", "all")
    assert args.torch_compile and args.dataloader_prefetch_factor == 5
    assert args.report_to == ["tensorboard", "wandb"] and args.fsdp_config["min_num_params"] == 10
    assert args.dataloader_pin_memory is False and args.include_num_input_tokens_seen == "all"


def test_help_shows_the_common_options_and_help_all_every_option():
    short = CliRunner().invoke(main, ["distill-from-cache", "--help"]).output
    full = CliRunner().invoke(main, ["distill-from-cache", "--help-all"]).output
    for section in ("Options:", "Distillation options:", "Common Trainer options:"):
        assert section in short and section in full
    for option in ("--out", "--temperature", "--top-k", "--learning-rate", "--optim", "--torch-compile"):
        assert option in short
    assert "--adam-beta1 FLOAT" not in short and "--help-all lists them" in short
    assert "Other Trainer options (TrainingArguments):" in full and "--adam-beta1 FLOAT" in full
    assert "--dataloader-prefetch-factor" in full and "Refused, since" in full
    assert "--do-eval" in full and "--do-eval " not in short
    assert len(full.splitlines()) > 2 * len(short.splitlines())


@pytest.mark.parametrize("argv, fragments", [
    (["--learning-rat", "1"], ["No such option: --learning-rat", "--learning-rate", "--help-all"]),
    (["--optim", "bogus"], ["Invalid value for '--optim'", "'bogus' is not one of", "adamw_torch"]),
    (["--alpha", "half"], ["Invalid value for '--alpha'", "'half' is not a valid float"]),
    (["--lr-scheduler-kwargs", "{power: 2"], ["'{power: 2' is not JSON", "a JSON object such as"]),
    (["--liger-kernel-config", "[1]"], ["'[1]' is not a JSON object"]),
    (["--do-eval"], ["do_eval=True cannot be honoured", "unidistill evaluate", "leave it at its default"]),
    (["--remove-unused-columns"], ["remove_unused_columns=True cannot be honoured", "teacher's targets"]),
    (["--parallelism-config", "x"], ["parallelism_config takes a ParallelismConfig object",
                                     "accelerate launch --config_file"]),
])
def test_a_bad_option_is_refused_with_what_is_valid(tmp_path, monkeypatch, argv, fragments):
    monkeypatch.setattr(trainer_run, "distill_from_cache", lambda *a, **k: pytest.fail("trained"))
    result = CliRunner().invoke(main, ["distill-from-cache", "--cache", "c", "--student", "s",
                                       "--out", str(tmp_path), *argv])
    assert result.exit_code == 2, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


@pytest.mark.parametrize("text, fragments", [
    ("learning_rat: 0.1\n", ["unknown keys", "learning_rat", "did you mean learning_rate?", "--help-all"]),
    ("temperature: 2\nkd_temperature: 3\n", ["one option under several keys",
                                              "'kd_temperature': ['temperature', 'kd_temperature']"]),
    ("optim: bogus\n", ["Invalid value for '--optim'", "'bogus' is not one of"]),
])
def test_a_bad_config_file_is_refused(tmp_path, monkeypatch, text, fragments):
    monkeypatch.setattr(trainer_run, "distill_from_cache", lambda *a, **k: pytest.fail("trained"))
    (tmp_path / "bad.yaml").write_text(text)
    result = CliRunner().invoke(main, ["distill-from-cache", "--cache", "c", "--student", "s",
                                       "--out", str(tmp_path), "--config", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 2, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_ablate_refuses_what_a_run_cannot_honour(tmp_path):
    with pytest.raises(ConfigError, match="leave output_dir out"):
        check_variants({"output_dir": "x"}, [{"name": "a"}])
    with pytest.raises(ConfigError, match="eval_strategy='steps' cannot be honoured"):
        run_arguments(tmp_path, {"name": "a", "eval_strategy": "steps"}, {})


def test_runs_recorded_before_the_recipe_defaults_moved_are_kept():
    """An ablation run recorded while the defaults were the Trainer's (3 epochs,
    remove_unused_columns True) trained as it would now when max_steps bounded it."""
    now = training_settings({"alpha": 1.0}, {"max_steps": 5}, ["fp"], {"files": "s"}, None)
    old = {**now, "arguments": {**now["arguments"], "num_train_epochs": 3.0,
                                "remove_unused_columns": True}}
    assert same_training(old, now)
    by_epochs = training_settings({"alpha": 1.0}, {}, ["fp"], {"files": "s"}, None)
    old_by_epochs = {**by_epochs, "arguments": {**by_epochs["arguments"], "num_train_epochs": 3.0}}
    assert not same_training(old_by_epochs, by_epochs)  # 3 epochs then, 1 now: trained again
    changed = {**now, "arguments": {**now["arguments"], "alpha": 0.5}}
    assert not same_training(changed, now)
