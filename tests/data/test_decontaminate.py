"""Benchmark decontamination: planted test questions are found, a disjoint corpus is clean,
byte-range chunks read the same rows as the data readers, data.decontaminate drops the rows,
and bad input is one error line."""
import json
import random
import re
from pathlib import Path

import pytest

from medjax.config import DataSection
from medjax.data import contamination
from medjax.data import decontaminate as dc
from medjax.data import decontaminate_scan as scan
from medjax.data.sources import read_rows

ROOT = Path(__file__).resolve().parents[2]
ROOT_ASSET = ROOT / "medjax" / "assets" / "med_instruct.jsonl"


@pytest.fixture
def bench_dir(tmp_path, benchmarks_dir):
    """First 60 MedQA and MMLU items, first 200 MedMCQA items (real files, cut short)."""
    d = tmp_path / "bench"
    d.mkdir()
    for name, rows in (("medqa_usmle_4options_test.jsonl", 60), ("mmlu_medical_test.jsonl", 60),
                       ("medmcqa_validation.jsonl", 200)):
        lines = (benchmarks_dir / name).read_text(encoding="utf-8").splitlines(True)[:rows]
        (d / name).write_text("".join(lines), encoding="utf-8")
    return d


def _questions(bench_dir, name, n, min_tokens=14):
    rows = [json.loads(line) for line in (bench_dir / name).read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if len(dc.normalize(r["question"])) >= min_tokens][:n]


def repunctuate(text: str) -> str:
    words = re.sub(r"[^\w\s]", " ", text).split()
    return " ".join(w + (", " if i % 4 == 3 else "") + ("-" if i % 7 == 6 else "")
                    for i, w in enumerate(words)) + "?!"


def _filler(rng, k=40):
    words = "the of patient a with and history presents clinic rest sleep walk water daily note".split()
    return " ".join(rng.choice(words) for _ in range(k))


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def planted_corpus(tmp_path, bench_dir):
    """Filler rows with test questions planted verbatim, recased and re-punctuated, in alpaca and
    chat rows; returns (path, {(task, item id): line})."""
    rng = random.Random(0)
    medqa = _questions(bench_dir, "medqa_usmle_4options_test.jsonl", 18)
    mmlu = _questions(bench_dir, "mmlu_medical_test.jsonl", 6)
    records, planted = [], {}
    for i in range(120):
        records.append({"instruction": _filler(rng), "input": "", "output": _filler(rng)})
    transforms = [lambda t: t, str.upper, str.swapcase, repunctuate]
    for k, (task, rec) in enumerate([("medqa_4options", r) for r in medqa] +
                                    [(f"mmlu_{r['subject']}", r) for r in mmlu]):
        text = transforms[k % len(transforms)](rec["question"])
        line = 3 + 5 * k
        if k % 2:
            records[line - 1] = {"messages": [{"role": "user", "content": f"{_filler(rng, 10)} {text} {_filler(rng, 5)}"},
                                              {"role": "assistant", "content": _filler(rng)}]}
        else:
            records[line - 1] = {"instruction": _filler(rng, 7), "input": text, "output": _filler(rng)}
        planted[(task, str(rec["realidx"]))] = line
    path = tmp_path / "corpus.jsonl"
    _write(path, records)
    return path, planted


def disjoint_corpus(tmp_path, bench_dir):
    """The bundled instruction set, plus rows of test-question words in shuffled order."""
    rng = random.Random(1)
    rows = [json.loads(line) for line in open(ROOT_ASSET, encoding="utf-8")]
    for rec in _questions(bench_dir, "medqa_usmle_4options_test.jsonl", 40, min_tokens=0):
        words = rec["question"].split()
        rng.shuffle(words)
        rows.append({"instruction": " ".join(words), "input": "", "output": " ".join(rec["options"].values())[::-1]})
    path = tmp_path / "disjoint.jsonl"
    _write(path, rows)
    return path


TASKS = ["medqa_4options", "medmcqa", "mmlu_medical"]


def test_numpy_tokens_are_the_normalised_words(benchmarks_dir):
    """The byte-level split the scan uses equals the regex definition, on every real question
    (some hold non-ASCII text: the other path)."""
    texts = ["Hello, World! 45-year-old man's BP: 120/80 mmHg; café – naïve\u00a0test _x_ ÀÉ"]
    for name in ("medqa_usmle_4options_test.jsonl", "medmcqa_validation.jsonl", "mmlu_medical_test.jsonl"):
        texts += [json.loads(line)["question"] for line in (benchmarks_dir / name).read_text().splitlines()]
    assert any(not t.isascii() for t in texts)
    for text in texts:
        data = dc.normalized_bytes(text)
        _, starts, ends = dc.token_hashes(data)
        assert [data[a:b].decode() for a, b in zip(starts, ends)] == dc.normalize(text), text


def test_planted_questions_are_all_found(tmp_path, bench_dir):
    path, planted = planted_corpus(tmp_path, bench_dir)
    rep = contamination.report(DataSection(train=str(path)), TASKS, bench_dir, n=13, workers=1)
    found = {(task, item["id"]): [r["row"] for r in item["rows"]]
             for task, row in rep["tasks"].items() for item in row["flagged"]}
    for key, line in planted.items():
        assert found.get(key) == [f"{path}:{line}"], key
    # Other items may share a real 13-gram with a planted question (MedQA's question stems), but
    # only with a planted row.
    planted_rows = {f"{path}:{line}" for line in planted.values()}
    assert all(set(rows) <= planted_rows for rows in found.values())
    assert len(found) - len(planted) <= 2
    assert rep["sources"][str(path)]["overlapping_rows"] == sorted(
        planted_rows, key=lambda w: int(w.rsplit(":", 1)[1]))
    medqa = rep["tasks"]["medqa_4options"]
    assert medqa["items"] == 60 and medqa["overlapping"] >= 18
    assert medqa["share"] == pytest.approx(medqa["overlapping"] / medqa["checked"])
    verbatim = next(item for item in medqa["flagged"] if item["id"] == str(
        _questions(bench_dir, "medqa_usmle_4options_test.jsonl", 1)[0]["realidx"]))
    assert verbatim["longest_span"] == " ".join(dc.normalize(_questions(
        bench_dir, "medqa_usmle_4options_test.jsonl", 1)[0]["question"]))
    text = contamination.markdown(rep)
    assert "| medqa_4options | 60 |" in text and f"{path}:{planted[('medqa_4options', verbatim['id'])]}" in text


def test_disjoint_corpus_flags_nothing(tmp_path, bench_dir):
    path = disjoint_corpus(tmp_path, bench_dir)
    rep = contamination.report(DataSection(train=str(path)), TASKS, bench_dir, n=13, workers=1)
    assert all(row["overlapping"] == 0 for row in rep["tasks"].values())
    assert rep["sources"][str(path)]["overlapping"] == 0 and rep["sources"][str(path)]["rows"] > 400


def test_chunks_read_the_rows_of_the_reader(tmp_path, bench_dir):
    path, _ = planted_corpus(tmp_path, bench_dir)
    chunks = scan.plan_chunks([{"path": str(path)}], chunk_bytes=1500)
    assert len(chunks) > 10
    assert [r for c in chunks for r in scan.chunk_rows(c)] == read_rows(str(path))


@pytest.mark.slow
def test_process_pool_finds_what_one_process_finds(tmp_path, bench_dir):
    path, _ = planted_corpus(tmp_path, bench_dir)
    chunks = scan.plan_chunks([{"path": str(path)}], chunk_bytes=1500)
    index = dc.BenchmarkIndex.build(contamination.test_items(TASKS, bench_dir), 13)
    one = scan.scan_sources(index, chunks, workers=1)
    two = scan.scan_sources(index, chunks, workers=2)
    assert sorted(one[str(path)]["matches"]) == sorted(two[str(path)]["matches"])
    assert one[str(path)]["rows"] == two[str(path)]["rows"] == 120


def test_data_decontaminate_drops_the_rows_and_logs_them(tmp_path, bench_dir, tokenizer, capsys):
    from medjax.data.pipeline import resolve_sources
    path, planted = planted_corpus(tmp_path, bench_dir)
    cfg = DataSection(train=str(path), format="alpaca", fields={"instruction": "instruction"},
                      decontaminate=("medqa_4options",), on_error="skip")
    rows = resolve_sources(cfg, tokenizer, benchmarks_dir=bench_dir)[0].rows
    medqa_lines = {line for (task, _), line in planted.items() if task == "medqa_4options"}
    kept = {int(r.where.rsplit(":", 1)[1]) for r in rows}
    assert not kept & medqa_lines
    every = resolve_sources(DataSection(train=str(path), format="alpaca", on_error="skip"), tokenizer)[0].rows
    assert [r for r in every if int(r.where.rsplit(":", 1)[1]) not in medqa_lines] == rows
    assert f"dropped 18 training row(s): 18 from {path}" in capsys.readouterr().err


def test_training_data_of_a_run_is_decontaminated(tmp_path, bench_dir, tokenizer, capsys):
    from medjax.config import load_config
    from medjax.train.loop import prepare_data
    path, planted = planted_corpus(tmp_path, bench_dir)
    cfg = load_config([ROOT / "configs" / "tiny" / "llama2.yaml"],
                      [f"data.train={path}", "data.format=alpaca", "data.on_error=skip", "data.heldout_rows=0",
                       "data.decontaminate=[medqa_4options,mmlu_medical]", f"eval.data_dir={bench_dir}"])
    prepare_data(cfg, tokenizer)
    assert f"dropped {len(planted)} training row(s): {len(planted)} from {path}" in capsys.readouterr().err


def test_config_checks_the_decontaminate_key():
    from medjax.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="data.decontaminate: unknown task 'medqa_5'"):
        DataSection(decontaminate=("medqa_5",))
    with pytest.raises(ConfigError, match="data.decontaminate_n must be an integer >= 5"):
        DataSection(decontaminate_n=3)
    with pytest.raises(ConfigError, match="data.decontaminate needs eval.data_dir"):
        load_config([ROOT / "configs" / "tiny" / "llama2.yaml"], ["data.decontaminate=[medqa_4options]"])


def _cli(argv, capsys):
    from medjax.cli_errors import run_cli
    from medjax.data.__main__ import main
    status = run_cli(main, argv)
    return status, capsys.readouterr().err.strip().splitlines()


def _config(tmp_path, train, bench):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{preset: tiny}}\ndata: {{train: '{train}', format: alpaca}}\n"
                   f"eval: {{data_dir: '{bench}'}}\n")
    return str(cfg)


def test_cli_writes_the_report(tmp_path, bench_dir, capsys):
    path, planted = planted_corpus(tmp_path, bench_dir)
    out = tmp_path / "rep"
    status, err = _cli(["decontaminate", "--config", _config(tmp_path, path, bench_dir), "data.on_error=skip",
                        "--tasks", "medqa_4options", "--out", str(out), "--workers", "1"], capsys)
    assert status == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert "| medqa_4options | 60 |" in (out / "report.md").read_text()
    dirty = contamination.dirty_ids(out / "report.json")["medqa_4options"]
    assert dirty >= {item_id for task, item_id in planted if task == "medqa_4options"}
    assert len(dirty) == rep["tasks"]["medqa_4options"]["overlapping"]


@pytest.mark.parametrize("case", ["no_test_file", "missing_source", "bad_source_line", "small_n"])
def test_cli_bad_input_is_one_error_line(tmp_path, bench_dir, capsys, case):
    path, _ = planted_corpus(tmp_path, bench_dir)
    out = tmp_path / "rep"
    train = path
    extra = ["--tasks", "medqa_4options"]
    if case == "no_test_file":
        extra = ["--tasks", "medqa_4options,pubmedqa"]
        expect = "task pubmedqa: no pubmedqa data in"
    elif case == "missing_source":
        train = tmp_path / "absent.jsonl"
        expect = f"no data files match '{train}'"
    elif case == "bad_source_line":
        lines = path.read_text().splitlines(True)
        lines[40] = '{"instruction": "cut off\n'
        path.write_text("".join(lines))
        expect = f"{path}:41: invalid JSON"
    else:
        extra += ["--n", "4"]
        expect = "--n 4: n-grams shorter than 5 tokens"
    argv = ["decontaminate", "--config", _config(tmp_path, train, bench_dir), "--out", str(out), *extra]
    status, err = _cli(argv, capsys)
    assert status == 2 and len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    assert not out.exists()
