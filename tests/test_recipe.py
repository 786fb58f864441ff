"""recipe.py: the recommended recipe is defined once, and distill's and train's defaults, the demo, the ablation's
default arm and the README all run or say exactly it."""
import os

import cli
import distill
import recipe
import train
from demo import ablation, builtin
from conftest import ROOT
from recipe import RECIPE

TRAIN_FIELDS = ("loss", "lm_weight", "likelihood", "batch_size", "lr", "epochs", "min_steps", "max_steps")


def test_train_defaults_are_the_recipe():
    cfg = train.TrainConfig()
    assert (cfg.loss, cfg.lm_weight, cfg.likelihood, cfg.batch_size, cfg.epochs, cfg.min_steps) == (
        RECIPE.loss, RECIPE.lm_weight, RECIPE.likelihood, RECIPE.batch_size, RECIPE.epochs, RECIPE.min_steps)
    assert cfg.lr == 0 and cfg.max_steps == -1  # the recipe's lr rule and step rule


def test_distill_defaults_write_the_recipes_pair_sets():
    cfg = distill.DistillConfig()
    assert (cfg.restyle, cfg.restyle_check, cfg.original_pairs) == (RECIPE.restyle, RECIPE.restyle_check,
                                                                    RECIPE.original_pairs)
    pairs = ablation.ARMS[ablation.DEFAULT_ARM][0]
    written = {"refined"} | ({"restyled", "crossed", "equivalent"} if RECIPE.restyle else set()) | (
        {"original"} if RECIPE.original_pairs else set())
    assert set(ablation.PAIR_SOURCES[pairs]) == written  # the default arm trains on all that distill writes


def test_the_ablations_default_arm_runs_train_with_the_recipe(tmp_path):
    """The default arm's `rmd.py train` options, parsed as rmd.py parses them, equal TrainConfig()'s recipe fields:
    the ablation measures what a user's `train --data=... --model=...` runs."""
    pairs, loss, lm, student, _ = ablation.ARMS[ablation.DEFAULT_ARM]
    args = ablation.AblationConfig()
    options = ablation.arm_options("train.jsonl", loss, RECIPE.lm_weight if lm else 0.0,
                                   ablation.DEFAULT_ARM in ablation.LIKELIHOOD_ARMS, "e.jsonl", str(tmp_path), args,
                                   0, "tiny")
    ran = cli.parse_overrides(train.TrainConfig(), options)
    assert {f: getattr(ran, f) for f in TRAIN_FIELDS} == {f: getattr(train.TrainConfig(), f) for f in TRAIN_FIELDS}
    assert args.sweep == str(RECIPE.lm_weight)  # no sweep by default: the arm runs the recipe's weight


def test_the_demo_sets_no_recipe_value_of_its_own():
    assert not set(builtin.DEMO_TRAIN) & set(TRAIN_FIELDS)
    assert builtin.DEMO_TRAIN["model"] == "tiny"  # the demo names its student; train's default names none


def test_the_step_rule_is_at_least_min_steps_and_at_least_the_epochs():
    assert recipe.total_steps(50) == RECIPE.min_steps  # a small data set: several passes
    assert recipe.total_steps(10_000) == 10_000  # a big one: one pass
    assert recipe.total_steps(300, epochs=2, min_steps=0) == 600


def test_the_lr_rule_gives_the_measured_rates_and_help_states_it():
    assert recipe.lr_for(900_000) == 1e-3  # the built-in tiny student
    assert recipe.lr_for(42_000_000) == 5e-5  # SmolLM2-135M cut to 4 layers
    assert recipe.lr_for(7_000_000_000) == 1e-5
    assert recipe.lr_rule_text() in cli.field_comments(train.TrainConfig)["lr"]


def test_readme_states_the_recipe():
    """README's recipe line is recipe.describe(): the README cannot promise a recipe the code does not run."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert recipe.describe() in " ".join(readme.split())
