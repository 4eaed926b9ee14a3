"""Every recipe in configs/ at ``model=tiny``: ``launch/local_multiprocess.sh -n 2 -d 2 --
python -m medjax.train`` against its ``main`` in the pytest process on 4 of the session's devices
(the mechanism and helpers: test_multihost_train.py; a file of its own so that pytest-xdist's
workers share the load)."""
import pytest

from medjax.recipes import RECIPES
from train.test_multihost_train import ROOT, _assert_close, _losses, _ok, _train, _train_here


@pytest.mark.slow
@pytest.mark.multidevice
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_trains_alike_in_two_processes(tmp_path, mesh_devices, recipe):
    """``model=tiny`` of each recipe (its data format, packing, gradient accumulation (at most 4
    micro-batches: the same accumulation loop as the recipe's 16), LoRA/QLoRA, NEFTune, DPO; the
    tiny overlay's ``data.on_error=skip``), 2 steps (the second after an optimizer update) of 4 rows
    per micro-batch (one per device):
    2 processes x 2 devices give the tokens per step of 1 x 4 exactly and its losses to 1e-5
    (``metrics.jsonl`` of each run). 2 x 2 rather than 2 x 4: gloo's cross-process all-reduce is
    ~3x cheaper (test_multihost_train._train), the same two-process mechanism."""
    import json

    from medjax.recipes import load_recipe
    grad_accum = min(4, load_recipe(recipe, ["model=tiny"]).train.grad_accum)
    args = ("--config", str(ROOT / "configs" / f"{recipe}.yaml"), "model=tiny", "train.steps=2",
            f"train.grad_accum={grad_accum}", f"train.batch_size={4 * grad_accum}", "train.export=[]",
            "eval.tasks=[]")
    with mesh_devices.use(4):
        _train_here(tmp_path / "one", recipe=args)
    _ok(_train(tmp_path / "two", recipe=args, processes=2, devices=2))
    tokens = [_losses(tmp_path / n, "tokens") for n in ("one", "two")]
    assert tokens[0] == tokens[1] and sorted(tokens[0]) == [1, 2], tokens
    _assert_close(_losses(tmp_path / "one"), _losses(tmp_path / "two"))
    for key in ("heldout_loss_before", "heldout_loss_after"):
        one, two = (json.loads((tmp_path / n / "summary.json").read_text())[key] for n in ("one", "two"))
        assert abs(one - two) <= 1e-5 * max(1.0, abs(one)), (key, one, two)
