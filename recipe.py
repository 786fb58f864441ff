"""recipe.py -- rmd's recommended recipe, defined once. Standard library only.

The recipe is what `python rmd.py distill` then `python rmd.py train --data=... --model=...` run with no other
options, what the demo runs and what the ablation's default arm runs (ablation arm n, chosen on the `valid` split:
RESULTS.md). Every one of those reads the values below; tests/test_recipe.py fails if a copy drifts.

    distill: refine y_l into y_w* and keep (y_w* > y_l); restyle y_w* and y_l into one other style (restyled, crossed
             and margin-0 style-equivalence pairs), the teacher checking that each rewrite kept the content; add each
             kept row's teacher-labelled original pair.
    train:   reward = value head + w x the answer's log-likelihood under a frozen copy of the student (the
             likelihood term, w learned: model.RewardModel); Bradley-Terry loss on every pair of train.jsonl with a
             strict preference (margin-0 pairs are dropped by bt), + 0.1 x the LM loss on the teacher's answers y_T;
             batches of 16 pairs; at least 400 optimizer steps and at least one pass over the data; the peak
             learning rate by the backbone's size (lr_for).

    import recipe
    recipe.RECIPE.loss, recipe.lr_for(42_000_000)   # -> 'bt', 5e-05
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    restyle: bool = True  # distill: the restyle stage (restyled, crossed, style-equivalence pairs)
    restyle_check: bool = True  # distill: the teacher checks each rewrite; one that changed the content gives no pair
    original_pairs: bool = True  # distill: each kept row's teacher-labelled input pair goes to train.jsonl too
    loss: str = "bt"  # train: the pairwise loss (Bradley-Terry; beat mse and bt-margin on valid)
    lm_weight: float = 0.1  # train: weight of the LM term on the teacher answers (0.1 vs 1.0 by the one-SE rule)
    batch_size: int = 16  # train: pairs per optimizer step
    min_steps: int = 400  # train: at least this many optimizer steps (a small data set gets several passes)
    epochs: int = 1  # train: and at least this many passes over the data
    # train: reward = value head + w x the answer's log-likelihood under a frozen copy of the student
    # (model.RewardModel), w learned (ablation arm n vs r, seed 0 of the default world: normal 96.8 vs 75.0, hard
    # 88.2 vs 61.3, mirror 97.8 vs 80.8, best-of-8 97.5 vs 75.5; RESULTS.md)
    likelihood: bool = True


RECIPE = Recipe()

# The peak learning rate by the backbone's parameter count (embeddings included): (fewer than N parameters, lr).
# Measured: the built-in tiny student (0.9M) at 1e-3 (every ablation run; not swept); SmolLM2-135M-Instruct cut
# to 4 layers (42M) at 5e-5 (RESULTS.md; not swept either). Not measured here: 1e-5 above 1B parameters, the usual
# full fine-tuning rate of 1B-8B reward models (TRL's and OpenRLHF's examples use 1e-5 to 9e-6).
LR_BY_SIZE = ((10_000_000, 1e-3), (1_000_000_000, 5e-5), (float("inf"), 1e-5))


def lr_for(parameters):
    """The recipe's peak learning rate for a backbone with `parameters` parameters (LR_BY_SIZE)."""
    return next(lr for limit, lr in LR_BY_SIZE if parameters < limit)


def lr_rule_text():
    """LR_BY_SIZE in words, as --help says it."""
    *below, (_, last) = LR_BY_SIZE
    return ", ".join(f"{lr:g} below {limit / 1e6:g}M parameters" for limit, lr in below) + f", {last:g} above"


def describe():
    """The recipe in one sentence (README.md quotes it; a test checks the quote)."""
    pairs = "refined pairs" + (" + their restyled, crossed and style-equivalence pairs" if RECIPE.restyle else "") + (
        " + the kept rows' teacher-labelled original pairs" if RECIPE.original_pairs else "")
    reward = "reward = value head + w x the answer's log-likelihood under a frozen copy of the student (w learned); " \
        if RECIPE.likelihood else ""
    return (f"{pairs}; {reward}{RECIPE.loss} loss + {RECIPE.lm_weight:g} x the LM loss on the teacher's answers; "
            f"{RECIPE.batch_size} pairs per step, max({RECIPE.min_steps} steps, {RECIPE.epochs} epoch); "
            f"peak lr {lr_rule_text()}")


def total_steps(steps_per_epoch, epochs=RECIPE.epochs, min_steps=RECIPE.min_steps):
    """Optimizer steps of a run: at least `epochs` passes and at least `min_steps` steps."""
    return max(min_steps, epochs * steps_per_epoch)
