"""The config language: YAML files merged in order, overrides, replaced keys, cross-section checks.

Each user mistake is a ``ConfigError`` naming the dotted key(s); through ``python -m medjax.train``
it is one ``error:`` line and exit status 2.
"""
from __future__ import annotations

import pytest
import yaml

from medjax.cli_errors import run_cli
from medjax.config import ConfigError, load_config, merge
from medjax.errors import UserError

BASE = {"model": {"preset": "tiny-llama2"}, "data": {"train": "rows.jsonl", "format": "alpaca"},
        "train": {"batch_size": 8}}


def _write(tmp_path, name, data) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_later_files_merge_into_earlier_ones_and_overrides_win(tmp_path):
    base = _write(tmp_path, "base.yaml", {**BASE, "lora": {"enabled": True, "targets": ["q_proj"]}})
    overlay = _write(tmp_path, "overlay.yaml", {"model": {"dtype": "bfloat16"},
                                                "lora": {"targets": ["v_proj", "o_proj"]}})
    cfg = load_config([base, overlay], ["model.dtype=float16"])
    assert cfg.model.preset == "tiny-llama2"                 # kept from the first file
    assert cfg.lora.enabled and cfg.lora.targets == ("v_proj", "o_proj")  # lists replace
    assert cfg.model.dtype == "float16"                      # the override wins over both files
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}, "d": 4}) == {"a": {"b": 1, "c": 3}, "d": 4}


@pytest.mark.parametrize("old, new", [("train.heldout_examples=8", "data.heldout_rows"),
                                      ("train.max_examples=64", "data.max_rows")])
def test_a_replaced_key_names_its_replacement(old, new):
    with pytest.raises(ConfigError, match=f"'{old.split('=')[0]}' was removed: use '{new}' instead"):
        load_config(None, ["model.preset=tiny-llama2", old])


def test_eval_mcqa_is_gone():
    with pytest.raises(ConfigError, match="'train.eval_mcqa' was removed: list benchmark tasks in eval.tasks"):
        load_config(None, ["model.preset=tiny-llama2", "train.eval_mcqa=true"])


@pytest.mark.parametrize("overrides, message", [
    (["train.objective=dpo"], r"train.objective=dpo needs data.format=preference \(every source\), got \['alpaca'\]"),
    (["data.format=preference"], "data.format=preference holds chosen/rejected pairs: it needs train.objective=dpo"),
    (["dpo.reference=adapters_off"], "dpo.reference=adapters_off needs lora.enabled=true"),
    (["mesh.preset=fsdp", "mesh.data=2", "mesh.fsdp=3"],
     r"train.batch_size=8 is not divisible by mesh.data=2 × mesh.fsdp=3"),
    (["mesh.num_processes=3"], "train.batch_size=8 is not divisible by mesh.num_processes=3"),
    (["lora.quantize=nf4"], "lora.quantize needs lora.enabled=true"),
    (["mesh.preset=fsdp", "mesh.tensor=2"], "mesh.tensor=2 is unused by mesh.preset='fsdp'"),
    (["data.train=null", "data.sources=[{path: a.jsonl}]", "data.heldout_rows=4"],
     "data.heldout_rows splits a single data.train source"),
])
def test_checks_that_span_sections_name_the_keys(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, "run.yaml", BASE), overrides)


def test_a_consistent_config_passes_the_cross_section_checks(tmp_path):
    cfg = load_config(_write(tmp_path, "run.yaml", BASE),
                      ["train.objective=dpo", "data.format=preference", "mesh.preset=fsdp",
                       "mesh.data=2", "mesh.fsdp=4", "mesh.num_processes=2"])
    assert (cfg.train.objective, cfg.mesh.fsdp) == ("dpo", 4)


def test_every_user_error_class_is_one_family():
    from medjax import errors
    from medjax.data import DataError as PipelineDataError
    from medjax.eval.readers import DataError as BenchmarkDataError
    from medjax.hf.safetensors_io import CheckpointError as WeightsError
    from medjax.train.checkpoint import CheckpointError as TrainCheckpointError
    assert PipelineDataError is BenchmarkDataError is errors.DataError
    assert WeightsError is TrainCheckpointError is errors.CheckpointError
    for cls in (errors.ConfigError, errors.DataError, errors.FieldError, errors.CheckpointError):
        assert issubclass(cls, UserError), cls


@pytest.mark.parametrize("overrides, line", [
    (["train.heldout_examples=8"],
     "error: config key 'train.heldout_examples' was removed: use 'data.heldout_rows' instead"),
    (["model=tiny"], "error: model=tiny: the config's model.preset 'gpt-9' names no family"),
    (["train.objective=dpo"], "error: train.objective=dpo needs data.format=preference"),
    (["mesh.data=3"], "error: train.batch_size=8 is not divisible by mesh.data=3"),
])
def test_a_config_mistake_at_the_command_line_is_one_error_line(tmp_path, capsys, overrides, line):
    """``python -m medjax.train`` (``run_cli(main)``, as its ``__main__`` does): exit 2, one line."""
    from medjax.train.__main__ import main
    config = _write(tmp_path, "run.yaml", {**BASE, "model": {"preset": "gpt-9"}})
    assert run_cli(main, ["--config", config, *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(line), err


def test_eval_and_export_take_the_mesh_from_mesh_flags():
    from medjax.config import MeshSection, mesh_overrides
    assert mesh_overrides([]) == MeshSection()
    assert mesh_overrides(["mesh.preset=fsdp", "mesh.fsdp=4"]) == MeshSection(preset="fsdp", fsdp=4)
    run_mesh = MeshSection(preset="fsdp_tp", tensor=2)      # a run checkpoint's own mesh, changed
    assert mesh_overrides(["mesh.tensor=1"], run_mesh) == MeshSection(preset="fsdp_tp", tensor=1)


@pytest.mark.parametrize("module", ["eval", "export"])
@pytest.mark.parametrize("flag, line", [
    ("train.steps=3", "error: 'train.steps=3': only mesh.* settings are accepted here"),
    ("mesh.preset=zero3", "error: mesh.preset"),
    ("mesh.tensor=2", "error: mesh.tensor=2 is unused by mesh.preset='dp'"),
])
def test_a_bad_mesh_flag_of_eval_or_export_is_one_error_line(tmp_path, capsys, module, flag, line):
    """Checked before any device is touched, the model loaded or the checkpoint read."""
    if module == "eval":
        from medjax.eval.__main__ import main
        argv = ["--model", str(tmp_path / "absent"), "--data-dir", str(tmp_path), "--tasks", "medqa", flag]
    else:
        from medjax.export.__main__ import main
        argv = ["--checkpoint", str(tmp_path / "absent"), "--out", str(tmp_path / "out"), flag]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(line), err
