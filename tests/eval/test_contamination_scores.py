"""``python -m medjax.eval --contamination report.json``: scores on all, clean and dirty items."""
import json

from medjax.config import DataSection
from medjax.data import contamination
from medjax.eval import readers
from medjax.eval.__main__ import main as eval_main
from medjax.eval.tasks import TASKS

N_ITEMS = 10
PLANTED = (1, 4, 7)


def test_clean_and_dirty_scores_split_the_items(tiny_smol_dirs, benchmarks_dir, tmp_path, capsys):
    bench = tmp_path / "bench"
    bench.mkdir()
    lines = (benchmarks_dir / "medqa_usmle_4options_test.jsonl").read_text(encoding="utf-8").splitlines(True)
    (bench / "medqa_usmle_4options_test.jsonl").write_text("".join(lines[:N_ITEMS]), encoding="utf-8")
    docs = readers.load_docs(TASKS["medqa_4options"], bench)
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Case notes. {docs[i]['question']} Discuss."}) + "\n"
                              for i in PLANTED), encoding="utf-8")
    rep = contamination.report(DataSection(train=str(corpus)), ["medqa_4options"], bench, n=13, workers=1)
    report_json = tmp_path / "report.json"
    report_json.write_text(json.dumps(rep))
    dirty = {docs[i]["id"] for i in PLANTED}
    assert contamination.dirty_ids(report_json)["medqa_4options"] >= dirty

    out = tmp_path / "out.json"
    assert eval_main(["--model", str(tiny_smol_dirs["smol"]), "--tasks", "medqa_4options", "--data-dir", str(bench),
                      "--contamination", str(report_json), "--output", str(out), "--log-samples"]) == 0
    result = json.loads(out.read_text())
    split = result["contamination"]["medqa_4options"]
    flagged = contamination.dirty_ids(report_json)["medqa_4options"]
    assert split["all"]["n"] == N_ITEMS == split["clean"]["n"] + split["dirty"]["n"]
    assert split["dirty"]["n"] == len(flagged)
    # the hand-computed split of the per-item scores
    samples = result["samples"]["medqa_4options"]
    for part, keep in (("clean", lambda s: docs[s["doc_id"]]["id"] not in flagged),
                       ("dirty", lambda s: docs[s["doc_id"]]["id"] in flagged), ("all", lambda s: True)):
        for metric in ("acc", "acc_norm"):
            chosen = [s[metric] for s in samples if keep(s)]
            assert split[part][metric] == sum(chosen) / len(chosen), (part, metric)
    assert split["all"]["acc"] == result["results"]["medqa_4options"]["acc"]
    text = capsys.readouterr().out
    assert "| task | metric | all (n) | clean (n) | dirty (n) |" in text
    assert f"({N_ITEMS}) | " in text and f"({len(flagged)}) |" in text


def test_a_file_that_is_not_a_report_is_one_error_line(benchmarks_dir, tmp_path, capsys):
    from medjax.cli_errors import run_cli
    bad = tmp_path / "report.json"
    bad.write_text(json.dumps({"results": {}}))
    status = run_cli(eval_main, ["--model", str(tmp_path), "--tasks", "medqa_4options", "--data-dir",
                                 str(benchmarks_dir), "--contamination", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith(f"error: --contamination {bad}: not a report")
