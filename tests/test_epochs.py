"""Recipes in epochs (bridle_jax/resolve.py, schedule.resolve_epochs): a batch-size override keeps the epochs, the
run says what the steps and the learning rates became, and a resume whose epochs resolve to other steps is refused.

The end-to-end run of a plan in epochs, and its refused resume at another batch, are in tests/test_train.py.
"""

import json

import pytest
from absl import flags

from bridle_jax import config_checks, finetune, recipes, resolve, schedule
from bridle_jax import workdir as workdir_lib
from tests import tiny

IMAGENET_TRAIN = 1_281_167
PRETRAINING = ("imagenet", "audioset", "kinetics400")  # the real-data pretraining recipes
FINETUNING = ("imagenet_finetune", "audioset_finetune", "kinetics400_finetune", "esc50_finetune", "sounds_finetune")


# ---------------------------------------------------------------------------------------------- the plan's grammar


def test_epochs_resolve_to_steps_and_steps_pass_through():
    phases = ("encoder_cold_start:200ep", "tokenizer:50", "encoder:0.5ep", "tokenizer:.25ep", "encoder:3 ep")
    assert schedule.in_epochs(phases) and not schedule.in_epochs(("encoder_cold_start:200",))
    assert schedule.resolve_epochs(phases, 1251) == (
        "encoder_cold_start:250200",
        "tokenizer:50",
        "encoder:626",  # round(625.5), banker's rounding: 626
        "tokenizer:313",
        "encoder:3753",
    )
    assert schedule.resolve_epochs(("encoder_cold_start:0.001ep",), 10) == ("encoder_cold_start:1",)  # >= 1 step
    assert schedule.steps_per_epoch(IMAGENET_TRAIN, 512) == 2502


@pytest.mark.parametrize("entry", ["encoder_cold_start:0ep", "encoder_cold_start:0.0ep"])
def test_zero_epochs_are_refused_naming_the_entry(entry):
    with pytest.raises(ValueError, match=f"entry 0 '{entry}': expected a positive number of epochs"):
        schedule.resolve_epochs((entry,), 100)


def test_an_unresolved_plan_is_never_parsed_as_steps():
    with pytest.raises(ValueError, match="entry 1 'tokenizer:2ep': a phase in epochs becomes steps"):
        schedule.parse_plan(("encoder_cold_start:5", "tokenizer:2ep"))


def test_a_train_split_smaller_than_a_batch_cannot_resolve_epochs():
    with pytest.raises(ValueError, match="has 100 examples, fewer than one global batch"):
        schedule.steps_per_epoch(100, 128)


@pytest.mark.parametrize(
    "phases, message",
    [
        (("encoder_cold_start:2ep", "encoder:2ep"), "entry 1 'encoder:2ep'"),  # kinds and order still checked
        (("encoder_cold_start:-1ep",), "entry 0"),
        (("encoder_cold_start:abcep",), "entry 0"),
    ],
)
def test_validate_checks_a_plan_in_epochs_naming_the_field(phases, message):
    c = tiny.tiny_config()
    c.schedule.phases = phases
    with pytest.raises(ValueError, match=rf"config\.schedule\.phases.*{message}"):
        config_checks.validate(c)


# ----------------------------------------------------------------------------------------------- the recipes


@pytest.mark.parametrize("name", PRETRAINING)
def test_pretraining_recipes_state_epochs_and_their_tuned_batch(name):
    c = tiny.load_config(name)
    assert all(entry.endswith("ep") for entry in c.schedule.phases), c.schedule.phases
    assert c.optim.tuned_batch_size == c.batch_size
    c.data.data_dir = "/unused"
    config_checks.validate(c)


@pytest.mark.parametrize("name", FINETUNING)
def test_finetuning_recipes_state_epochs_and_their_tuned_batch(name):
    c = recipes.load(name)
    assert c.epochs > 0 and c.eval_every_epochs > 0 and 0 <= c.warmup_epochs < c.epochs
    assert c.optim.tuned_batch_size == c.batch_size


def test_the_readme_imagenet_command_at_batch_512_keeps_200_epochs(tmp_path, monkeypatch):
    """The blocker: `--config.batch_size=512` used to keep 250,200 steps per encoder phase (100 epochs)."""
    monkeypatch.chdir(tmp_path)
    argv = ["prog", "--config=imagenet", "--config.batch_size=512"]
    fv = flags.FlagValues()
    recipes.DEFINE_config_flag("config", flag_values=fv, sys_argv=argv)
    fv(argv)
    c, notes = resolve.pretraining(fv.config, lambda: IMAGENET_TRAIN)
    per_epoch = IMAGENET_TRAIN // 512
    plan = schedule.parse_plan(c.schedule.phases)
    assert [p.steps for p in plan] == [200 * per_epoch, 50 * per_epoch, 200 * per_epoch]
    assert c.schedule.given_phases == ("encoder_cold_start:200ep", "tokenizer:50ep", "encoder:200ep")
    assert c.schedule.steps_per_epoch == per_epoch
    assert fv.config.schedule.phases == c.schedule.given_phases  # the caller's config is left as given
    assert "2,502 steps per epoch" in notes[0] and "encoder_cold_start 200ep = 500,400 steps" in notes[0]
    # the lrs: tuned at 1024, kept (the authors' absolute lrs), and the run says so and how to scale them
    assert (c.optim.encoder.lr, c.optim.tokenizer.lr) == (5e-4, 2e-4)
    assert "tuned at batch 1,024" in notes[1] and "unchanged" in notes[1] and "lr_scaling=linear" in notes[1]


def test_linear_lr_scaling_is_opt_in_and_applied_once():
    c = tiny.load_config("imagenet")
    c.batch_size, c.optim.lr_scaling = 256, "linear"
    once, notes = resolve.pretraining(c, lambda: IMAGENET_TRAIN)
    assert once.optim.encoder.lr == pytest.approx(5e-4 / 4) and once.optim.tokenizer.lr == pytest.approx(2e-4 / 4)
    assert "scales them by 0.25" in notes[-1]
    twice, notes = resolve.pretraining(once, lambda: pytest.fail("a resolved plan needs no split size"))
    assert twice.optim.encoder.lr == once.optim.encoder.lr and twice.schedule.phases == once.schedule.phases
    assert notes == []
    c.optim.lr_scaling = "sqrt"
    c.data.data_dir = "/unused"
    with pytest.raises(ValueError, match="config.optim.lr_scaling"):
        config_checks.validate(c)


def test_a_plan_in_steps_needs_no_split_size_and_records_nothing():
    c = tiny.tiny_config()
    resolved, notes = resolve.pretraining(c, lambda: pytest.fail("not needed"))
    assert resolved.schedule.phases == c.schedule.phases and notes == []
    assert resolved.schedule.given_phases is None and resolved.schedule.steps_per_epoch is None


# ----------------------------------------------------------------------------------------------- fine-tuning


def test_finetune_epochs_resolve_at_this_batch_and_epoch_len():
    c = recipes.load("imagenet_finetune")
    c.batch_size = 512
    r, notes = resolve.finetuning(c, lambda: IMAGENET_TRAIN)
    assert (r.num_steps, r.warmup_steps, r.eval_every_steps) == (200 * 2502, 5 * 2502, 2502)
    assert "200 epochs = 500,400 steps" in notes[0] and "tuned at batch 1,024" in notes[1]
    as2m = recipes.load("audioset_finetune")  # an epoch is the weighted sampler's 200k clips, not the split
    r, _ = resolve.finetuning(as2m, lambda: pytest.fail("epoch_len decides"))
    assert (r.num_steps, r.eval_every_steps) == (200 * 781, 781)


def test_finetune_epoch_fields_are_checked_by_name():
    c = recipes.load("esc50_finetune")
    c.init_from = "/some/workdir"
    c.data.data_dir = "/some/data"
    c.warmup_epochs = c.epochs
    with pytest.raises(ValueError, match="config.warmup_epochs"):
        finetune.validate(c)
    c.epochs, c.warmup_epochs, c.eval_every_epochs = None, None, 1
    with pytest.raises(ValueError, match="config.epochs"):
        finetune.validate(c)


def test_finetune_resume_under_other_resolved_steps_is_refused():
    recorded = {"num_steps": 100, "warmup_steps": 10, "eval_every_steps": 10, "batch_size": 32, "lr": 1e-3}
    finetune.runner._check_same_schedule(recorded, dict(recorded), "W")  # pylint: disable=protected-access
    changed = dict(recorded, num_steps=200, batch_size=16)
    with pytest.raises(ValueError, match=r"num_steps: 100 -> 200; batch_size: 32 -> 16"):
        finetune.runner._check_same_schedule(recorded, changed, "W")  # pylint: disable=protected-access


# ----------------------------------------------------------------------------------------------- resume


def _started(tmp_path, train_examples: int):
    c = tiny.tiny_config()
    c.schedule.phases = ("encoder_cold_start:1ep", "tokenizer:0.5ep", "encoder:1ep")
    return resolve.pretraining(c, lambda: train_examples)[0]


def test_a_resume_on_a_train_split_of_another_size_is_refused_naming_the_fields(tmp_path):
    workdir = str(tmp_path)
    workdir_lib.record_start(workdir, _started(tmp_path, 1438), {})
    assert workdir_lib.check_resume(workdir, _started(tmp_path, 1438)) == {}  # the same data: exact
    with pytest.raises(workdir_lib.ResumeRefused) as e:
        workdir_lib.check_resume(workdir, _started(tmp_path, 2000))  # data_dir is free to move; the size is not
    message = str(e.value)
    assert "schedule.phases: ['encoder_cold_start:89'" in message and "-> ['encoder_cold_start:125'" in message
    assert "schedule.steps_per_epoch: 89 -> 125" in message
    assert "--config.resume.allow_changes=schedule.phases" in message
    history = json.loads((tmp_path / "config.json").read_text())["schedule"]
    assert history["given_phases"] == ["encoder_cold_start:1ep", "tokenizer:0.5ep", "encoder:1ep"]
