"""Tiny arena fixtures: random HF models with a byte tokenizer + ChatML, a tiny training run,
a three-question file and a short rubric (byte tokens make the bundled rubric long)."""
import json

import pytest

TEST_RUBRIC = ("Question: {{ question }}\n{% if reference %}Notes: {{ reference }}\n{% endif %}"
               "A: {{ answer_a }}\nB: {{ answer_b }}\nBetter (A, B or tie):")


def tiny_chat_model(out, seed):
    from train.train_helpers import make_tiny_model_dir
    make_tiny_model_dir(out, family="llama3", seed=seed, max_position_embeddings=1024)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "chatml"
    cfg_path.write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="session")
def arena_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("arena")
    questions = root / "questions.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "mi", "question": "Chest pain: what first?", "reference": "Aspirin, ECG."},
        {"question": "Anaphylaxis drug?"},
        {"id": "hypo", "question": "Low sugar: what to eat?"}]))
    rubric = root / "rubric.jinja"
    rubric.write_text(TEST_RUBRIC)
    return {"questions": questions, "rubric": rubric,
            "alpha": tiny_chat_model(root / "alpha", 0), "judge": tiny_chat_model(root / "judge", 7)}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, arena_files):
    """A LoRA training run of 2 steps from the ``alpha`` model (a run checkpoint contestant)."""
    from train.train_helpers import tiny_config, write_alpaca

    from medjax.run import run
    root = tmp_path_factory.mktemp("tiny_run")
    cfg = tiny_config(arena_files["alpha"], write_alpaca(root / "train.jsonl"), root / "run",
                      train__steps=2, checkpoint__every=2,
                      lora__enabled=True, lora__rank=2, lora__alpha=4, lora__targets=["q_proj", "v_proj"])
    run(cfg, show_bar=False)
    return root / "run"
