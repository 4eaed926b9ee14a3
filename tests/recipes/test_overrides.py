"""Command-line overrides against a recipe's own values (issue 30): ``train.steps=N`` given on the
command line wins over the recipe's ``train.epochs`` (MELT's card: 3 epochs), and both given is one
error line naming the two keys."""
from pathlib import Path

import pytest

from medjax.config import load_config
from medjax.errors import ConfigError

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "melt_llama2_lora.yaml"
INPUTS = ["model.path=/models/base", "data.train=my_med.jsonl"]


def _train(*overrides):
    return load_config(RECIPE, [*INPUTS, *overrides], check_inputs=False).train


def test_recipe_epochs_decide_the_length_without_an_override():
    assert _train().epochs == 3


def test_explicit_steps_override_wins_over_recipe_epochs():
    t = _train("train.steps=1", "checkpoint.every=1")
    assert (t.steps, t.epochs) == (1, None)


def test_explicit_epochs_override_still_applies():
    assert _train("train.epochs=2").epochs == 2


def test_steps_and_epochs_both_given_is_one_error_naming_both(capsys):
    from medjax.cli_errors import run_cli
    from medjax.train.__main__ import main
    rc = run_cli(main, ["--config", str(RECIPE), *INPUTS, "train.steps=1", "train.epochs=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert "train.steps=1" in err[0] and "train.epochs=2" in err[0]
    with pytest.raises(ConfigError):
        _train("train.steps=1", "train.epochs=2")
