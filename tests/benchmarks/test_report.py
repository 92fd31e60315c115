"""benchmarks/report.py: figures computed from the scripts' JSON, rendered into results.md and the README."""

import pytest

from tests.helpers.scripts import BENCHMARKS, ROOT, load_script

report = load_script(BENCHMARKS / "report.py")

# what the scripts write with `--json` (the shapes of generate.py, train.py, rl.py, serve.py, memory.py)
CANNED = {
    "decode": {"benchmark": "generate", "rows": [
        {"dtype": "fp32", "batch": 1, "system": "ours", "tok_s": 400.0},
        {"dtype": "fp32", "batch": 1, "system": "llama", "tok_s": 160.0},
        {"dtype": "fp32", "batch": 8, "system": "ours", "tok_s": 1500.0},
        {"dtype": "fp32", "batch": 8, "system": "llama", "tok_s": 1000.0}]},
    "train": {"benchmark": "train", "rows": [
        {"system": "ours", "precision": "fp32", "tok_s_wall": 2100.0, "tok_s_cpu": 1100.0, "mfu_own_peak_pct": 80.0},
        {"system": "seed", "precision": "fp32", "tok_s_wall": 1500.0, "tok_s_cpu": 800.0, "mfu_own_peak_pct": 60.0}],
        "ratios": [{"other": "seed", "precision": "fp32", "clock": "wall", "median": 1.41, "min": 1.3, "max": 1.5},
                   {"other": "seed", "precision": "fp32", "clock": "cpu", "median": 1.38, "min": 1.3, "max": 1.5}]},
    "rl": {"benchmark": "rl", "systems": {"ours": {"rollouts": 64, "runs": 3, "s_per_iter": 0.64, "ms_per_rollout": 10.0},
                                         "seed": {"rollouts": 16, "runs": 1, "s_per_iter": 3.2, "ms_per_rollout": 200.0}}},
    "serve": {"benchmark": "serve", "rows": [
        {"system": "ours", "clients": 16, "tok_s_concurrent": 900.0, "tok_s_sequential": 300.0, "ttft_p50_s": 0.1},
        {"system": "hf", "clients": 16, "tok_s_concurrent": 300.0, "tok_s_sequential": 100.0, "ttft_p50_s": 1.0}]},
    "memory": {"benchmark": "memory", "rows": [
        {"system": "ours", "tokens": 2048, "peak_mib": 200.0},
        {"system": "seed", "tokens": 2048, "peak_mib": 500.0},
        {"system": "llama", "tokens": 2048, "peak_mib": None}]},
    "trl": {"rows": [{"trainer": "dpo", "outcome": "DPO held-out accuracy", "target": 1.3, "ours_s_per_step": 0.4,
                      "ours_rss_mib": 450.0, "ours_outcome": 1.0, "trl_s_per_step": 0.6, "trl_rss_mib": 600.0,
                      "trl_outcome": 1.0}], "raw": {}, "threads": 2, "steps": 6, "repeats": 1, "quick": True},
}
META = {"cpu": "Test CPU", "cores": 2, "torch": "2.13.0", "python": "3.12.0", "threads": "2", "date": "2026-12-07 03:00 UTC",
        "loadavg_start": [1.0, 1.5, 2.0], "loadavg_end": [3.0, 2.5, 2.0], "load_start": 1.0, "load_end": 3.0,
        "seconds": 600.0}


def canned(drop=()):
    results = {k: v for k, v in CANNED.items() if k not in drop}
    return {"meta": META, "commands": {n: report.command(n) for n in report.BENCHMARKS}, "results": results,
            "failures": {"serve": "did not finish in 600 s"} if "serve" in drop else {}}


def test_ratios_from_canned_output():
    figures = {(r["what"], r["ratio"]) for r in report.rows(canned())}
    assert ("decode, fp32, batch 1, tokens/s", "2.50x") in figures          # 400 / 160
    assert ("decode, fp32, batch 8, tokens/s", "1.50x") in figures          # 1500 / 1000
    assert any(w.startswith("training step, config S, fp32") and r == "1.41x" for w, r in figures)  # per-repeat median
    assert any(w.startswith("PPO iteration") and r == "20.0x faster" for w, r in figures)  # 200 / 10 ms
    assert ("serving, 16 concurrent clients, completion tokens/s", "3.00x") in figures  # 900 / 300
    assert any(w.startswith("training step peak memory, 2,048") and r == "0.40x" for w, r in figures)  # 200 / 500
    assert any(w.startswith("DPO on a Llama checkpoint, seconds per") and r == "1.50x" for w, r in figures)  # 0.6 / 0.4
    assert any(w.startswith("DPO peak RSS") and r == "0.75x" for w, r in figures)  # 450 / 600
    assert len(figures) == 8


def test_results_md_round_trips_and_names_host_load_and_commands():
    data = canned()
    text = report.render_results(data)
    assert report.parse_results(text) == data
    assert report.table(report.parse_results(text)) == report.table(data)  # the order survives sorted JSON keys
    assert "host CPU: Test CPU (2 cores)" in text
    noted = {**data, "meta": {**META, "note": "shared with other jobs"}}
    assert "- note: shared with other jobs" in report.render_results(noted)
    assert "at the end (shared with other jobs)" in report.readme_block(noted)
    assert "at the start: 1.00, 1.50, 2.00; at the end: 3.00, 2.50, 2.00" in text
    for row in report.table(data).splitlines()[2:]:
        assert "`python benchmarks/" in row, row  # every figure next to its command


def test_missing_benchmarks_are_named():
    data = canned(drop=("serve",))
    assert "serving" not in report.table(data)
    assert "Missing from this run: decode-seed (not run); serve (did not finish in 600 s)." in report.render_results(data)


def test_readme_block_replaces_only_between_markers():
    text = f"intro\n{report.START}\nstale 93.9% MFU\n{report.END}\noutro\n"
    out = report.replace_block(text, report.readme_block(canned()))
    assert out.startswith("intro\n") and out.endswith(f"{report.END}\noutro\n")
    assert "stale" not in out and "Test CPU" in out
    assert report.between_markers(out) == report.readme_block(canned())
    with pytest.raises(ValueError, match="markers"):
        report.replace_block("no markers here", "x")


def test_section_blocks_hold_their_own_figures():
    data = canned(drop=("serve",))
    decode = report.section_block(data, "decode")
    assert "decode, fp32, batch 8" in decode and "PPO" not in decode
    assert report.section_block(data, "serve").startswith("Not measured in the last")
    text = "".join(f"## {s}\n{report.markers(s)[0]}\nold\n{report.markers(s)[1]}\n" for s in report.SECTIONS)
    for section in report.SECTIONS:
        text = report.replace_block(text, report.section_block(data, section), section)
    assert report.between_markers(text, "rl") == report.section_block(data, "rl")


def test_readme_tables_are_the_ones_results_md_renders():
    """README.md's results table and benchmarks/README.md's section tables cannot drift from
    benchmarks/results.md: rerun `python benchmarks/report.py --render-only` after editing either."""
    data = report.parse_results((ROOT / "benchmarks" / "results.md").read_text())
    assert report.between_markers((ROOT / "README.md").read_text()) == report.readme_block(data)
    bench = (ROOT / "benchmarks" / "README.md").read_text()
    for section in report.SECTIONS:
        assert report.between_markers(bench, section) == report.section_block(data, section), section
