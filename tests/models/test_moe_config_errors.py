"""num_experts_per_tok > num_local_experts in a user's config.json: one `error:` line, exit 2,
through the train and plan CLIs (run in-process under run_cli, as `python -m` does)."""
import json

import pytest

from medjax.cli_errors import run_cli
from medjax.models import get_preset


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_bad")
    model = root / "model"                     # config.json is read before any weight
    model.mkdir()
    hf = get_preset("tiny-mixtral").to_hf_config()
    hf["num_experts_per_tok"] = hf["num_local_experts"] + 1
    (model / "config.json").write_text(json.dumps(hf))
    (root / "train.jsonl").write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}))
    yaml = root / "run.yaml"
    yaml.write_text(f"model: {{path: {model}, dtype: float32}}\n"
                    f"data: {{train: {root / 'train.jsonl'}, format: alpaca, seq_len: 32}}\n"
                    f"train: {{steps: 1, batch_size: 2, out_dir: {root / 'out'}}}\n")
    return yaml, model, hf["num_experts_per_tok"], hf["num_local_experts"]


@pytest.mark.parametrize("cli", ["train", "plan"])
def test_too_many_experts_per_token_is_one_error_line(bad_run, cli, capsys):
    if cli == "train":
        from medjax.train.__main__ import main
    else:
        from medjax.plan.__main__ import main
    yaml, model, k, E = bad_run
    rc = run_cli(main, ["--config", str(yaml)] + (["--num-devices", "1"] if cli == "plan" else []))
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and "Traceback" not in "\n".join(err)
    assert "error:" in err[-1] and "config.json" in err[-1], err[-1]
    assert f"num_experts_per_tok {k}" in err[-1] and f"1..{E}" in err[-1], err[-1]
