"""``python -m medjax.bench peers``: bad input (no peer venv needed), the table's arithmetic, the
loss-agreement check, and end to end on a tiny preset when the peer venvs exist."""
import math

import numpy as np
import pytest

from medjax.bench import __main__ as bench
from medjax.bench import _peers_report as report
from medjax.bench import peers
from medjax.bench._peers import protocol
from medjax.cli_errors import run_cli

HAVE_PEERS = all((peers.REPO / v / "bin" / "python").exists() for v in peers.PEERS.values())
needs_peer_venvs = pytest.mark.skipif(not HAVE_PEERS, reason="needs `make peers-venv`")


def _error_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_unknown_peer_is_one_error_line_naming_the_make_target(capsys):
    assert run_cli(bench.main, ["peers", "--peers", "easydel,maxtext"]) == 2
    (line,) = _error_lines(capsys)
    assert line.startswith("error: ") and "'maxtext'" in line and "make peers-venv" in line


def test_missing_peer_venv_is_one_error_line_naming_the_make_target(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(peers, "REPO", tmp_path)             # a checkout without the peer venvs
    monkeypatch.setattr(peers.peer_python, "__defaults__", (tmp_path,))
    assert run_cli(bench.main, ["peers", "--peers", "levanter"]) == 2
    (line,) = _error_lines(capsys)
    assert line.startswith("error: ") and ".venv-levanter" in line and "make peers-venv" in line


@pytest.mark.parametrize("argv, words", [
    (["--peers", ","], "at least one"),
    (["--modes", "full,qlora"], "--modes"),
    (["--repeats", "0"], "--repeats"),
    (["--tpu", "h100"], "TPU slice"),
    (["--tpu", "v5p-6"], "no topology"),
])
def test_bad_options_are_one_error_line(monkeypatch, tmp_path, capsys, argv, words):
    for venv in peers.PEERS.values():                       # venvs present: only the option is bad
        (tmp_path / venv / "bin").mkdir(parents=True)
        (tmp_path / venv / "bin" / "python").touch()
    monkeypatch.setattr(peers.peer_python, "__defaults__", (tmp_path,))
    assert run_cli(bench.main, ["peers", *argv]) == 2
    (line,) = _error_lines(capsys)
    assert line.startswith("error: ") and words in line


def _run(loss, step_s, first=10.0, rss=1024.0):
    return {"loss": loss, "step_s": step_s, "first_step_s": first, "second_step_s": 0.5,
            "peak_rss_mib": rss}


def test_summary_takes_median_and_min_of_runs():
    s = report.summarize_cpu([_run(2.0, 1.0), _run(2.0, 2.0), _run(2.0, 4.0, rss=3072.0)], 2048)
    assert s["tokens_per_s"] == 1024.0 and s["tokens_per_s_min"] == 512.0
    assert s["peak_rss_gib"] == 3.0 and s["first_step_s"] == 10.0 and s["runs"] == 3
    assert report.summarize_cpu([{"error": "boom"}], 2048) == {"error": "boom"}
    partial = report.summarize_cpu([_run(2.0, 1.0), {"error": "exit -9"}], 2048)
    assert partial["runs"] == 1 and partial["failed_runs"] == 1 and partial["tokens_per_s"] == 2048.0
    assert any("1 of 2 runs failed (exit -9)" in p for p in report.errors({"cpu full": {"easydel": partial}}))


def test_ratio_is_medjax_over_peer_and_the_better_side_follows_the_unit():
    rows = {"cpu full": {"medjax": report.summarize_cpu([_run(3.0, 1.0, first=20.0)], 1000),
                         "easydel": report.summarize_cpu([_run(3.0, 2.0, first=10.0)], 1000)}}
    text = report.table(rows, ["easydel"])
    tok = next(line for line in text.splitlines() if "tokens/s (median" in line)
    first = next(line for line in text.splitlines() if "first step" in line)
    assert "| 1,000.0 | 500.0 | 2 | medjax |" in tok              # more tokens/s: medjax wins
    assert "| 20 | 10 | 2 | easydel |" in first                    # more seconds: the peer wins
    assert report.ratio(1.0, 0) is None and report.ratio(None, 2.0) is None


def test_tpu_summary_and_table():
    run = {"peak_bytes": 40 * 2**30, "compiled_flops": 3e15, "model_flops": 2e15,
           "optimal_seconds": 1.25, "compile_s": 90.0}
    s = report.summarize_tpu(run)
    assert s == {"peak_gib": 40.0, "optimal_seconds": 1.25, "flops_ratio": 1.5, "compile_s": 90.0,
                 "scanned_layers": False}
    text = report.table({"tpu full (v5p-8)": {"medjax": s, "levanter": {"error": "x"}}}, ["levanter"])
    assert "peak memory per chip (GiB) | 40 | error |" in text


def test_tpu_rows_use_medjax_model_flops_and_leave_scanned_peers_without_a_ratio(monkeypatch, tmp_path,
                                                                              capsys):
    for venv in peers.PEERS.values():
        (tmp_path / venv / "bin").mkdir(parents=True)
        (tmp_path / venv / "bin" / "python").touch()
    monkeypatch.setattr(peers.peer_python, "__defaults__", (tmp_path,))
    calls = []
    monkeypatch.setattr(peers, "medjax_tpu", lambda kind, count, b, t, log, unroll=False, hlo=None: calls.append((kind, count)) or {
        "peak_bytes": 30 * 2**30, "compiled_flops": 2.4e14, "model_flops": 2e14, "optimal_seconds": 1.2})
    fake = {"easydel": {"peak_bytes": 20 * 2**30, "compiled_flops": 2.2e14, "optimal_seconds": 0.6,
                        "scanned_layers": False},
            "levanter": {"peak_bytes": 40 * 2**30, "compiled_flops": 3e12, "optimal_seconds": 0.02,
                         "scanned_layers": True}}
    monkeypatch.setattr(peers, "peer_tpu", lambda name, topo, b, t, log, unroll=False, hlo=None: dict(fake[name]))
    out = tmp_path / "tpu.json"
    assert bench.main(["peers", "--tpu", "v5p-8", "--workdir", str(tmp_path / "w"), "--json", str(out)]) == 0
    assert calls == [("v5p", 4)]
    text = capsys.readouterr().out
    flops = next(line for line in text.splitlines() if "compiled FLOPs" in line)
    assert "| 1.2 | 1.1 | 1.09 | easydel | – | – |" in flops       # levanter: scanned, no ratio
    import json
    raw = json.loads(out.read_text())["raw"]["levanter"]
    assert raw["compiled_flops_raw"] == 3e12 and raw["optimal_seconds_raw"] == 0.02


def test_tpu_per_op_costs_undeclared_kernels_at_medjax_declared_cost(monkeypatch, tmp_path, capsys):
    """Layers unrolled: each side's HLO text is read op by op, and a peer's attention kernels
    that declare no cost get medjax's declared cost per kind in the *costed* rows."""
    from test_hlo_ops import MODULE
    for venv in peers.PEERS.values():
        (tmp_path / venv / "bin").mkdir(parents=True)
        (tmp_path / venv / "bin" / "python").touch()
    monkeypatch.setattr(peers.peer_python, "__defaults__", (tmp_path,))
    medjax_text = MODULE.replace("splash_mha_dq_segmented_block_q_512.1", "medjax_flash_bwd_dq.1").replace(
        '"body":"TUzv"}', '"body":"TUzv","cost_estimate":{"flops":"788000000000","bytes_accessed":"1"}}')
    easydel_text = MODULE.replace("medjax_flash_fwd.1", "splash_mha_fwd.1").replace(
        ',"cost_estimate":{"flops":"394000000000","transcendentals":"268500992","bytes_accessed":"134742016","remote_bytes_transferred":"0"}', "")

    def medjax(kind, count, b, t, log, unroll=False, hlo=None):
        hlo.write_text(medjax_text)
        return {"peak_bytes": 2**30, "compiled_flops": 2.4e12, "model_flops": 2e12, "optimal_seconds": 0.012}

    def peer(name, topo, b, t, log, unroll=False, hlo=None):
        hlo.write_text(easydel_text)
        return {"peak_bytes": 2**30, "compiled_flops": 1.2e12, "optimal_seconds": 0.009, "scanned_layers": False}
    monkeypatch.setattr(peers, "medjax_tpu", medjax)
    monkeypatch.setattr(peers, "peer_tpu", peer)
    assert bench.main(["peers", "--tpu", "v5p-8", "--peers", "easydel", "--unroll-layers",
                       "--workdir", str(tmp_path / "w")]) == 0
    text = capsys.readouterr().out
    costed = next(line for line in text.splitlines() if "optimal_seconds, every attention kernel costed" in line)
    assert "| 0.012 | 0.012 | 1 |" in costed                 # 0.009 + 1 ms fwd + 2 ms dq
    ratio = next(line for line in text.splitlines() if "model FLOPs, every attention kernel costed" in line)
    assert "| 1.2 | 1.191 |" in ratio                        # (1.2e12 + 394e9 + 788e9) / 2e12
    assert "| easydel | kernel splash_mha_fwd (no cost declared) | 1 |" in text
    assert "costed at medjax's declared cost: +1.182e+12 FLOPs, +0.003 s (2 kernels)" in text


def test_loss_agreement_can_fail():
    mj = report.summarize_cpu([_run(2.5, 1.0)], 100)
    assert report.loss_agreement(mj, report.summarize_cpu([_run(2.5 + 5e-5, 1.0)], 100)) is None
    bad = report.loss_agreement(mj, report.summarize_cpu([_run(2.5 + 2e-4, 1.0)], 100))
    assert bad and "2.00e-04" in bad and "1e-04" in bad
    assert report.loss_agreement(mj, {"loss": math.nan}) is not None
    rows = {"cpu lora": {"medjax": mj, "levanter": {"loss": 2.6, **{k: 1.0 for k in (
        "tokens_per_s", "tokens_per_s_min", "first_step_s", "second_step_s", "peak_rss_gib")}}}}
    assert "MISMATCH" in report.table(rows, ["levanter"])
    assert any("levanter" in p and "do not compute the same step" in p for p in report.errors(rows))


def test_a_loss_mismatch_fails_the_command(monkeypatch, tmp_path, capsys):
    for venv in peers.PEERS.values():
        (tmp_path / venv / "bin").mkdir(parents=True)
        (tmp_path / venv / "bin" / "python").touch()
    monkeypatch.setattr(peers.peer_python, "__defaults__", (tmp_path,))
    rows = {"cpu full": {"medjax": report.summarize_cpu([_run(2.5, 1.0)], 100),
                         "easydel": report.summarize_cpu([_run(2.7, 1.0)], 100)}}
    monkeypatch.setattr(peers, "run_cpu", lambda args, names, workdir: (rows, {}))
    assert bench.main(["peers", "--peers", "easydel", "--workdir", str(tmp_path / "w")]) == 1
    assert "problem: cpu full easydel: first-step loss" in capsys.readouterr().out


def test_protocol_matches_the_trainer_defaults_bench_train_uses():
    from medjax.config.sections import LoraSection, OptimSection
    o = OptimSection()
    assert (o.b1, o.b2, o.eps, o.weight_decay) == (protocol.B1, protocol.B2, protocol.EPS,
                                                   protocol.WEIGHT_DECAY)
    assert tuple(LoraSection().targets) == protocol.LORA_TARGETS
    assert protocol.LORA_ALPHA == 2 * protocol.LORA_RANK         # bench train: alpha = 2 * rank
    assert protocol.parse_result("log\nPEER-RESULT {\"loss\": 1.5}\nmore") == {"loss": 1.5}


def test_medjax_batch_masks_the_last_position():
    from medjax.bench._peers_medjax import medjax_batch
    ids = np.arange(12, dtype=np.int32).reshape(2, 6)
    b = medjax_batch(ids)
    assert (b["targets"][:, :-1] == ids[:, 1:]).all()
    assert (b["loss_mask"][:, -1] == 0).all() and (b["loss_mask"][:, :-1] == 1).all()


@pytest.mark.slow
@needs_peer_venvs
def test_peers_tiny_preset_end_to_end(tmp_path, capsys):
    out = tmp_path / "peers.json"
    rc = bench.main(["peers", "--model", "preset:tiny-llama2", "--batch", "2", "--seq", "32",
                     "--repeats", "1", "--steps", "1", "--workdir", str(tmp_path / "w"),
                     "--json", str(out)])
    assert rc == 0, capsys.readouterr().out                  # every loss agreed, no side failed
    import json
    rows = json.loads(out.read_text())["rows"]
    for mode in ("cpu full", "cpu lora"):
        for side in ("medjax", "easydel", "levanter"):
            assert rows[mode][side]["tokens_per_s"] > 0
