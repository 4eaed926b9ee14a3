"""Every recipe in configs/ at ``model=tiny``: ``launch/local_multiprocess.sh -n 2 -d 4 --
python -m medjax.train`` against its ``main`` in the pytest process on the session's 8 devices
(the mechanism and helpers: test_multihost_train.py; a file of its own so that pytest-xdist's
workers share the load)."""
import pytest

from medjax.recipes import RECIPES
from train.test_multihost_train import ROOT, _assert_close, _losses, _ok, _train, _train_here


@pytest.mark.slow
@pytest.mark.multidevice
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_trains_alike_in_two_processes(tmp_path, recipe):
    """``model=tiny`` of each recipe (its data format, packing, grad_accum, LoRA/QLoRA, NEFTune,
    DPO; the tiny overlay's ``data.on_error=skip``), 3 steps of 8 rows per micro-batch (one per
    device): 2 processes x 4 devices give the tokens per step of 1 x 8 exactly and its losses
    to 1e-5 (``metrics.jsonl`` of each run)."""
    import json

    from medjax.recipes import load_recipe
    grad_accum = load_recipe(recipe, ["model=tiny"]).train.grad_accum
    args = ("--config", str(ROOT / "configs" / f"{recipe}.yaml"), "model=tiny", "train.steps=3",
            f"train.batch_size={8 * grad_accum}", "train.export=[]", "eval.tasks=[]")
    _train_here(tmp_path / "one", recipe=args)
    _ok(_train(tmp_path / "two", recipe=args, processes=2))
    tokens = [_losses(tmp_path / n, "tokens") for n in ("one", "two")]
    assert tokens[0] == tokens[1] and sorted(tokens[0]) == [1, 2, 3], tokens
    _assert_close(_losses(tmp_path / "one"), _losses(tmp_path / "two"))
    for key in ("heldout_loss_before", "heldout_loss_after"):
        one, two = (json.loads((tmp_path / n / "summary.json").read_text())[key] for n in ("one", "two"))
        assert abs(one - two) <= 1e-5 * max(1.0, abs(one)), (key, one, two)
