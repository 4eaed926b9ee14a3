"""Bad input stops before any model loads: one ``error:`` line naming the file and line, exit 2."""
import json

import pytest

from medjax.arena.__main__ import main
from medjax.arena.questions import DEFAULT_QUESTIONS, load_questions
from medjax.arena.rubric import DEFAULT_RUBRIC, FIELDS, load_rubric
from medjax.cli_errors import run_cli


def cli(capsys, *argv):
    status = run_cli(main, list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return status, err


def base_args(tmp_path, questions=None, rubric=None, models="a=x.gguf,b=y.gguf"):
    args = ["--models", models, "--judge", "j.gguf", "--out", str(tmp_path / "out")]
    if questions:
        args += ["--questions", str(questions)]
    if rubric:
        args += ["--rubric", str(rubric)]
    return args


def test_question_row_without_question(tmp_path, capsys):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question": "ok?"}) + "\n\n" + json.dumps({"prompt": "where is it?"}) + "\n")
    status, err = cli(capsys, *base_args(tmp_path, questions=q))
    assert status == 2 and len(err) == 1
    assert err[0].startswith(f"error: {q}:3: ") and "'question'" in err[0] and "prompt" in err[0]


def test_question_file_invalid_json(tmp_path, capsys):
    q = tmp_path / "q.jsonl"
    q.write_text('{"question": "fine"}\n{"question": broken}\n')
    status, err = cli(capsys, *base_args(tmp_path, questions=q))
    assert status == 2 and len(err) == 1 and err[0].startswith(f"error: {q}:2: ")


def test_unknown_template_field(tmp_path, capsys):
    r = tmp_path / "rubric.jinja"
    r.write_text("Question: {{ question }}\n{% set x = 1 %}{{ x }}\nPatient: {{ patient_age }}\n{{ answer_a }}")
    status, err = cli(capsys, *base_args(tmp_path, rubric=r))
    assert status == 2 and len(err) == 1
    assert err[0].startswith(f"error: {r}:3: unknown template field 'patient_age'")


def test_template_syntax_error(tmp_path, capsys):
    r = tmp_path / "rubric.jinja"
    r.write_text("line one\n{% if question %}\nno endif\n")
    status, err = cli(capsys, *base_args(tmp_path, rubric=r))
    assert status == 2 and len(err) == 1 and err[0].startswith(f"error: {r}:")
    assert "syntax" in err[0]


@pytest.mark.parametrize("models", ["only=m.gguf", "a=m.gguf,", ""])
def test_fewer_than_two_models(tmp_path, capsys, models):
    status, err = cli(capsys, *base_args(tmp_path, models=models))
    assert status == 2 and len(err) == 1
    assert "at least two models" in err[0]


def test_duplicate_names_and_unknown_anchor(tmp_path, capsys):
    status, err = cli(capsys, *base_args(tmp_path, models="a=x,a=y"))
    assert status == 2 and "given twice" in err[0]
    status, err = cli(capsys, *base_args(tmp_path), "--anchor", "c")
    assert status == 2 and "--anchor 'c'" in err[0]


def test_missing_model_path(tmp_path, capsys):
    status, err = cli(capsys, *base_args(tmp_path, models=f"a={tmp_path},b={tmp_path / 'nope.gguf'}"))
    assert status == 2 and len(err) == 1
    assert err[0] == f"error: --models b: {tmp_path / 'nope.gguf'}: no such file or directory"
    assert not (tmp_path / "out").exists()


def test_bundled_questions_and_rubric():
    questions = load_questions(DEFAULT_QUESTIONS)
    assert len(questions) == 20 and len({q.id for q in questions}) == 20
    assert all(q.reference for q in questions)
    rubric = load_rubric(DEFAULT_RUBRIC)
    text = rubric.render(**{f: f"<{f}>" for f in FIELDS})
    assert all(f"<{f}>" in text for f in FIELDS)
    assert text.rstrip().endswith("or tie if they are equally good or equally poor.")


def test_chat_template_option(tmp_path, capsys):
    status, err = cli(capsys, *base_args(tmp_path), "--chat-template", "a=vicuna")
    assert status == 2 and "--chat-template a: unknown template 'vicuna'" in err[0]
    status, err = cli(capsys, *base_args(tmp_path), "--chat-template", "c=llama3")
    assert status == 2 and "'c=llama3' is not MODEL=TEMPLATE" in err[0]
    status, err = cli(capsys, *base_args(tmp_path), "--judge-chat-template", "vicuna")
    assert status == 2 and "--judge-chat-template: unknown template 'vicuna'" in err[0]


def test_builtin_template_for_a_model_without_one():
    from medjax.arena.answers import AnswerSettings, chat_prompt
    from medjax.arena.questions import Question
    from medjax.tokenizer import byte_tokenizer
    from medjax.errors import CheckpointError

    tokenizer, question = byte_tokenizer(), Question("1", "Dose of aspirin?")
    with pytest.raises(CheckpointError, match="no chat template"):
        chat_prompt(tokenizer, question, AnswerSettings())
    text = tokenizer.decode(chat_prompt(tokenizer, question, AnswerSettings(system="Be brief."), "llama3"),
                            skip_special_tokens=False)
    assert text == ("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nDose of aspirin?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
