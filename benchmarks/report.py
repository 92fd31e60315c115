"""The headline figures in one command: decode, training, the RL iteration, serving, memory and the
trainers against TRL, each side by side with its peers, with quick settings (about 10-15 minutes on 2 idle cores; pass `--threads 1` when they are busy).

    python benchmarks/report.py                      # run everything, write benchmarks/results.md, update README.md
    python benchmarks/report.py --threads 1          # on a busy 2-core machine
    python benchmarks/report.py --only decode rl     # some of them (the others are listed as missing)
    python benchmarks/report.py --render-only        # rebuild the README tables from benchmarks/results.md

Each benchmark script runs in its own subprocess with `--json PATH`; this script reads those files
(it never scrapes the printed tables), computes every ratio, and writes `benchmarks/results.md`: the
host CPU (lscpu's model name), torch version, threads, date, the load average at the start and the
end, each ratio next to the exact command that produced it, and the raw results as JSON. The
README's results table, between `<!-- results:start -->` and `<!-- results:end -->`, is rendered
from the JSON in results.md, and so is each section's table in benchmarks/README.md (between
`<!-- results:SECTION:start -->` and `<!-- results:SECTION:end -->`); tests/benchmarks/test_report.py
checks that they agree.

The settings are quick (fewer repeats, fp32 only, fewer lengths and clients than each script's
defaults): each script's own docstring gives the full run, and benchmarks/README.md its tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results.md"
README = ROOT / "README.md"
BENCH_README = ROOT / "benchmarks" / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
DATA = re.compile(r"^```json\n(.*?)^```$", re.DOTALL | re.MULTILINE)

# name -> the script and its quick settings (the report appends `--json PATH`)
BENCHMARKS: dict[str, list[str]] = {
    "decode": ["benchmarks/generate.py", "--systems", "ours", "llama", "--batches", "1", "8",
               "--dtypes", "fp32", "--repeats", "2"],
    "decode-seed": ["benchmarks/generate.py", "--systems", "ours", "seed", "--batches", "1",
                    "--dtypes", "fp32", "--repeats", "1"],
    "train": ["benchmarks/train.py", "--systems", "ours", "seed", "llama", "--precisions", "fp32",
              "--repeats", "2", "--steps", "1", "--warmup", "1"],
    "rl": ["benchmarks/rl.py", "--repeats", "3", "--seed-repeats", "1", "--seed-rollouts", "16"],
    "serve": ["benchmarks/serve.py", "--systems", "ours", "hf", "--levels", "1", "16", "--repeats", "1",
              "--threads", "1"],
    "memory": ["benchmarks/memory.py", "--lengths", "2048"],
    "trl": ["benchmarks/trl.py", "--quick", "--repeats", "1"],
}


def argv(name: str, threads: int = 2) -> list[str]:
    """The script and its quick settings, with `--threads` when not the scripts' default of 2 (serving: 1)."""
    args = list(BENCHMARKS[name])
    if threads != 2 and name != "serve":
        args += ["--threads", str(threads)]
    return args


def command(name: str, threads: int = 2) -> str:
    return "python " + shlex.join(argv(name, threads))


# ---- rows: the figures, computed from the scripts' JSON -------------------------------------------

def _fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None or v != v else f"{v:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b or a != a or b != b else f"{a / b:.2f}x"


def _decode_rows(r: dict, name: str) -> list[dict]:
    tok = {(row["dtype"], row["batch"], row["system"]): row["tok_s"] for row in r["rows"]}
    rows = []
    for (dtype, batch, system), ours in sorted(tok.items()):
        if system != "ours":
            continue
        for peer, label in (("llama", "HF Llama + KV cache"), ("seed", "seed package")):
            if (dtype, batch, peer) in tok:
                theirs = tok[(dtype, batch, peer)]
                rows.append({"what": f"decode, {dtype}, batch {batch}, tokens/s", "ours": _fmt(ours),
                             "peer": f"{label}: {_fmt(theirs)}", "ratio": _ratio(ours, theirs), "command": name})
    return rows


def _train_rows(r: dict, name: str) -> list[dict]:
    tok = {(row["system"], row["precision"]): row["tok_s_wall"] for row in r["rows"]}
    rows = []
    for ratio in r["ratios"]:
        if ratio["clock"] != "wall" or ratio["other"] not in ("seed", "llama"):
            continue
        prec, other = ratio["precision"], ratio["other"]
        label = {"seed": "seed package", "llama": "HF Llama"}[other]
        rows.append({"what": f"training step, config S, {prec}, tokens/s (median of per-repeat ratios)",
                     "ours": _fmt(tok.get(("ours", prec))), "peer": f"{label}: {_fmt(tok.get((other, prec)))}",
                     "ratio": f"{ratio['median']:.2f}x", "command": name})
    return rows


def _rl_rows(r: dict, name: str) -> list[dict]:
    ours, seed = r["systems"].get("ours"), r["systems"].get("seed")
    if not ours or not seed:
        return []
    return [{"what": f"PPO iteration, ms per collected rollout (ours {ours['rollouts']}, "
                     f"seed {seed['rollouts']} rollouts per iteration)",
             "ours": _fmt(ours["ms_per_rollout"], 1), "peer": f"seed `RLHFTrainer`: {_fmt(seed['ms_per_rollout'], 1)}",
             "ratio": f"{seed['ms_per_rollout'] / ours['ms_per_rollout']:.1f}x faster", "command": name}]


def _serve_rows(r: dict, name: str) -> list[dict]:
    tok = {(row["system"], row["clients"]): row["tok_s_concurrent"] for row in r["rows"]}
    rows = []
    for (system, clients), ours in sorted(tok.items(), key=lambda kv: kv[0][1]):
        if system == "ours" and ("hf", clients) in tok:
            theirs = tok[("hf", clients)]
            rows.append({"what": f"serving, {clients} concurrent client{'s' if clients > 1 else ''}, "
                                 "completion tokens/s", "ours": _fmt(ours, 1),
                         "peer": f"HF pipeline behind the same API: {_fmt(theirs, 1)}",
                         "ratio": _ratio(ours, theirs), "command": name})
    return rows


def _memory_rows(r: dict, name: str) -> list[dict]:
    peak = {(row["system"], row["tokens"]): row["peak_mib"] for row in r["rows"]}
    rows = []
    for (system, n), ours in sorted(peak.items(), key=lambda kv: kv[0][1]):
        if system != "ours":
            continue
        peers = [(s, v) for (s, m), v in peak.items() if m == n and s != "ours" and v is not None]
        label = " / ".join(f"{ {'seed': 'seed package', 'llama': 'HF Llama'}.get(s, s)}: {_fmt(v)}" for s, v in peers)
        lowest = min((v for _, v in peers), default=None)
        rows.append({"what": f"training step peak memory, {n:,} tokens, batch 1, MiB above the step's start "
                             f"(lower is better; ratio to the lower peer)",
                     "ours": _fmt(ours), "peer": label or "-", "ratio": _ratio(ours, lowest), "command": name})
    return rows


def _trl_rows(r: dict, name: str) -> list[dict]:
    rows = []
    for row in r["rows"]:
        rows.append({"what": f"{row['trainer'].upper()} on a Llama checkpoint, seconds per optimizer step "
                             f"(--quick: 3.2M parameters)", "ours": f"{row['ours_s_per_step']:.3f}",
                     "peer": f"TRL 1.16: {row['trl_s_per_step']:.3f}",
                     "ratio": f"{row['trl_s_per_step'] / row['ours_s_per_step']:.2f}x", "command": name})
        rows.append({"what": f"{row['trainer'].upper()} peak RSS, MiB (lower is better)", "ours": _fmt(row["ours_rss_mib"]),
                     "peer": f"TRL 1.16: {_fmt(row['trl_rss_mib'])}", "ratio": _ratio(row["ours_rss_mib"], row["trl_rss_mib"]),
                     "command": name})
    return rows


ROWS = {"decode": _decode_rows, "decode-seed": _decode_rows, "train": _train_rows, "rl": _rl_rows,
        "serve": _serve_rows, "memory": _memory_rows,
        "trl": _trl_rows}


def rows(data: dict) -> list[dict]:
    """Every figure of the report, in BENCHMARKS order, from the data block of results.md."""
    out = []
    for name in BENCHMARKS:  # not the JSON's key order: results.md stores its keys sorted
        if name in data["results"]:
            out.extend(ROWS[name](data["results"][name], name))
    return out


# ---- rendering -------------------------------------------------------------------------------------

def host_line(meta: dict) -> str:
    note = f" ({meta['note']})" if meta.get("note") else ""
    return (f"{meta['cpu']}, {meta['cores']} cores, torch {meta['torch']}, threads {meta['threads']}, "
            f"{meta['date']}; load average (1 min) {meta['load_start']:.2f} at the start, "
            f"{meta['load_end']:.2f} at the end{note}")


def table(data: dict, names=None) -> str:
    """The figures of `names` (default: every benchmark) as one markdown table."""
    lines = ["| what | ours | peer | ratio | command |", "| --- | --- | --- | --- | --- |"]
    for row in rows(data):
        if names is not None and row["command"] not in names:
            continue
        lines.append(f"| {row['what']} | {row['ours']} | {row['peer']} | **{row['ratio']}** | "
                     f"`{data['commands'][row['command']]}` |")
    return "\n".join(lines)


def missing_line(data: dict) -> str:
    missing = [name for name in BENCHMARKS if name in data["commands"] and name not in data["results"]]
    if not missing:
        return ""
    why = data.get("failures", {})
    return "Missing from this run: " + "; ".join(f"{m} ({why.get(m, 'not run')})" for m in missing) + "."


def render_results(data: dict) -> str:
    meta = data["meta"]
    parts = [
        "# Benchmark results",
        "",
        "Written by `python benchmarks/report.py`; do not edit by hand (rerun it). The README's results",
        "table is rendered from the JSON at the end of this file.",
        "",
        f"- host CPU: {meta['cpu']} ({meta['cores']} cores)",
        f"- torch {meta['torch']}, Python {meta['python']}, threads {meta['threads']}",
        f"- date: {meta['date']}",
        f"- load average (1, 5, 15 min) at the start: {', '.join(f'{v:.2f}' for v in meta['loadavg_start'])}; "
        f"at the end: {', '.join(f'{v:.2f}' for v in meta['loadavg_end'])}",
        f"- wall time: {meta['seconds']:.0f} s",
        *([f"- note: {meta['note']}"] if meta.get("note") else []),
        "",
        "Every system of a row runs in the same process, interleaved, so a ratio compares like with like",
        "under the same load; the absolute figures move with the host and its load.",
        "",
        table(data),
    ]
    if missing_line(data):
        parts += ["", missing_line(data)]
    parts += ["", "## Data", "", "```json", json.dumps(data, indent=1, sort_keys=True), "```", ""]
    return "\n".join(parts)


def parse_results(text: str) -> dict:
    match = DATA.search(text)
    if match is None:
        raise ValueError("benchmarks/results.md has no ```json block: rerun `python benchmarks/report.py`")
    return json.loads(match.group(1))


def readme_block(data: dict) -> str:
    """What README.md holds between the markers."""
    lines = [f"Measured on {host_line(data['meta'])}, by `python benchmarks/report.py` (quick settings; "
             "[benchmarks/results.md](benchmarks/results.md) has the raw figures, "
             "[benchmarks/README.md](benchmarks/README.md) the full runs and methods). Every ratio compares "
             "systems timed side by side in one process; it depends on the host, so rerun the command on yours.",
             "", table(data)]
    if missing_line(data):
        lines += ["", missing_line(data)]
    return "\n".join(lines)


# benchmarks/README.md: each section's current table, between <!-- results:SECTION:start/end --> markers
SECTIONS = {"decode": ("decode", "decode-seed"), "train": ("train",), "rl": ("rl",), "serve": ("serve",),
            "memory": ("memory",), "trl": ("trl",)}


def markers(section: str | None = None) -> tuple[str, str]:
    if section is None:
        return START, END
    return f"<!-- results:{section}:start -->", f"<!-- results:{section}:end -->"


def section_block(data: dict, section: str) -> str:
    """What benchmarks/README.md holds between a section's markers."""
    names = SECTIONS[section]
    meta = data["meta"]
    if not any(n in data["results"] for n in names):
        return (f"Not measured in the last `python benchmarks/report.py` run ({meta['date']}): "
                + "; ".join(f"{n}: {data.get('failures', {}).get(n, 'not run')}" for n in names) + ".")
    return (f"Quick settings, by `python benchmarks/report.py` on {host_line(meta)} "
            f"([results.md](results.md)):\n\n" + table(data, names))


def replace_block(text: str, block: str, section: str | None = None) -> str:
    start_mark, end_mark = markers(section)
    start, end = text.find(start_mark), text.find(end_mark)
    if start < 0 or end < start:
        raise ValueError(f"no {start_mark} ... {end_mark} markers around the results table")
    return text[: start + len(start_mark)] + "\n" + block + "\n" + text[end:]


def between_markers(text: str, section: str | None = None) -> str:
    start_mark, end_mark = markers(section)
    start, end = text.find(start_mark), text.find(end_mark)
    if start < 0 or end < start:
        raise ValueError(f"no {start_mark} ... {end_mark} markers")
    return text[start + len(start_mark): end].strip("\n")


def update_readmes(data: dict) -> None:
    README.write_text(replace_block(README.read_text(), readme_block(data)))
    text = BENCH_README.read_text()
    for section in SECTIONS:
        text = replace_block(text, section_block(data, section), section)
    BENCH_README.write_text(text)


# ---- running -------------------------------------------------------------------------------------

def host_cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def run_all(names: list[str], timeout: float, on_progress=None, threads: int = 2) -> dict:
    """Run `names` one after another; `on_progress(data)` after each, so a run cut short keeps what finished."""
    import torch

    t0, load_start = time.time(), os.getloadavg()
    results, failures = {}, {}

    def data() -> dict:
        meta = {"cpu": host_cpu(), "cores": os.cpu_count(), "torch": torch.__version__,
                "python": platform.python_version(), "threads": f"{threads} (serving: 1 per server process)",
                "date": datetime.datetime.fromtimestamp(t0, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
                "load_start": load_start[0], "load_end": os.getloadavg()[0], "seconds": time.time() - t0}
        return {"meta": meta, "commands": {n: command(n, threads) for n in BENCHMARKS}, "results": dict(results),
                "failures": {**failures, **{n: "did not finish: the run was cut short" for n in names
                                             if n not in results and n not in failures}}}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, *argv(name, threads), "--json", str(out)]
            print(f"[report] {command(name, threads)}", flush=True)
            start = time.time()
            try:
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                failures[name] = f"did not finish in {timeout:.0f} s"
                print(f"[report] {name}: {failures[name]}", flush=True)
                continue
            if proc.returncode != 0 or not out.exists():
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                failures[name] = f"exit {proc.returncode}: {tail}"
                print(f"[report] {name}: {failures[name]}", flush=True)
                continue
            results[name] = json.loads(out.read_text())
            print(f"[report] {name}: {time.time() - start:.0f} s, load average {os.getloadavg()[0]:.2f}", flush=True)
            if on_progress is not None:
                on_progress(data())
    final = data()
    final["failures"] = failures  # what did not run at all is "not run"
    return final


def write(data: dict) -> None:
    RESULTS.write_text(render_results(data))
    update_readmes(data)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run these benchmarks only")
    p.add_argument("--timeout", type=float, default=480, help="seconds each benchmark may take")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads of each benchmark (serving keeps 1 per server); 1 on a busy 2-core machine")
    p.add_argument("--note", help="a remark on the host's state, kept in results.md (e.g. 'shared with other jobs')")
    p.add_argument("--render-only", action="store_true",
                   help="rebuild README.md's table from benchmarks/results.md without running anything")
    args = p.parse_args(argv)
    if args.render_only:
        data = parse_results(RESULTS.read_text())
        if args.note:
            data["meta"]["note"] = args.note
            RESULTS.write_text(render_results(data))
    else:
        def progress(data: dict) -> None:
            data["meta"]["note"] = args.note
            write(data)

        data = run_all(args.only or list(BENCHMARKS), args.timeout, on_progress=progress, threads=args.threads)
        data["meta"]["note"] = args.note
        RESULTS.write_text(render_results(data))
        print(f"[report] wrote {RESULTS.relative_to(ROOT)}")
    update_readmes(data)
    print("[report] updated the results tables in README.md and benchmarks/README.md")
    print(table(data))


if __name__ == "__main__":
    main()
