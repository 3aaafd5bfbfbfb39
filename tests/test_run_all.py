"""run_all.sh end to end: FAST=1 chain into tmp_path, then a second call that skips every stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "run_all.sh"


def _run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, "RUNS_DIR": str(tmp_path / "runs"), **env}
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=tmp_path,
        env=full,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_help_and_bad_argument(tmp_path):
    r = _run(tmp_path, "--help", FAST="1")
    assert r.returncode == 0
    for var in (
        "DATA=",
        "MODEL=smallnet_s",
        "N_INGREDIENTS=2",
        "EPOCHS=1",
        "DEVICE=auto",
        "RUN=fast",
    ):
        assert var in r.stdout
    r = _run(tmp_path, "--bogus")
    assert r.returncode == 2
    assert "unknown argument" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_fast_chain_then_skip(tmp_path):
    r = _run(tmp_path, FAST="1", RUN="t")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    summary = json.loads((run / "summary.json").read_text())
    rows = {row["result"]: row for row in summary["rows"]}
    sections = [row["section"] for row in summary["rows"]]
    assert sections.count("rotnet") >= 2  # pretext accuracy + at least one block
    assert sections.count("few_labels") == 2
    assert sections.count("ingredients") == 2
    for name in (
        "supervised base model (all labels)",
        "uniform soup (2 ingredients)",
        "greedy soup + TTA shift (submission.csv)",
        "soft vote over 2 ingredients",
        "Caruana selection over ingredients",
        "dirty-MNIST exact match (multi-label, BCE)",
    ):
        assert name in rows, sorted(rows)
    for row in summary["rows"]:
        if row["section"] != "rotnet":  # synth letters has a labelled test part
            assert 0.0 <= row["test_acc"] <= 1.0, row
        assert 0.0 <= row["val_acc"] <= 1.0, row
    md = (run / "summary.md").read_text()
    assert "greedy soup" in md and "Caruana" in md and "dirty-MNIST" in md
    sub = (run / "submission.csv").read_text().splitlines()
    assert sub[0] == "id,label" and len(sub) == 201  # NUM_TEST=200 under FAST=1
    assert (run / "soup" / "greedy.jsonl").exists() and (run / "soup" / "soup.png").exists()

    t = time.perf_counter()
    again = _run(tmp_path, FAST="1", RUN="t")
    seconds = time.perf_counter() - t
    assert again.returncode == 0, again.stderr[-3000:]
    stage_lines = [ln for ln in again.stdout.splitlines() if ln.startswith("== ")]
    assert len(stage_lines) >= 20 and all(ln.startswith("== skip ") for ln in stage_lines)
    assert seconds < 30
    assert json.loads((run / "summary.json").read_text())["rows"] == summary["rows"]


def _ref() -> dict:
    """run_all.sh's calibration (REF_SPEED, REF_SECONDS, FIXED_SECONDS, FIT_SECONDS)."""
    line = next(ln for ln in SCRIPT.read_text().splitlines() if ln.startswith("REF_SPEED="))
    return {k: float(v) for k, v in (kv.split("=") for kv in line.split())}


def test_plan_fits_the_default_sizes_to_the_speed(tmp_path):
    ref = _ref()
    # at the reference speed the default run takes REF_SECONDS: shrunk so that it takes
    # FIT_SECONDS; the fixed part does not shrink
    speed = int(ref["REF_SPEED"])
    s = (ref["FIT_SECONDS"] - ref["FIXED_SECONDS"]) / (ref["REF_SECONDS"] - ref["FIXED_SECONDS"])
    n, d = round(10000 * s / 500) * 500, round(20000 * s / 500) * 500
    r = _run(tmp_path, "--plan", FIT_SPEED=str(speed))
    assert r.returncode == 0, r.stderr
    assert f"NUM_IMAGES={n} DIRTY_IMAGES={d} (x{s:.2f})" in r.stdout
    assert not (tmp_path / "runs").exists()  # --plan writes nothing
    # half the speed: the scalable part takes twice as long
    s2 = (ref["FIT_SECONDS"] - ref["FIXED_SECONDS"]) / (
        2 * (ref["REF_SECONDS"] - ref["FIXED_SECONDS"])
    )
    r = _run(tmp_path, "--plan", FIT_SPEED=str(speed // 2), NUM_IMAGES="8000")
    assert (
        f"NUM_IMAGES=8000 DIRTY_IMAGES={round(20000 * s2 / 500) * 500} " in r.stdout
    )  # given: kept
    # fast enough: the default sizes; FIT=0 and FAST=1: no fitting at all
    r = _run(tmp_path, "--plan", FIT_SPEED=str(speed * 3))
    assert "default sizes; NUM_IMAGES=10000 DIRTY_IMAGES=20000" in r.stdout
    for env, n in (({"FIT": "0"}, 10000), ({"FAST": "1"}, 2000)):
        r = _run(tmp_path, "--plan", FIT_SPEED="1", **env)
        assert "no fitting" in r.stdout and f"NUM_IMAGES={n} " in r.stdout
    r = _run(tmp_path, "--plan", FIT_SPEED="fast")
    assert r.returncode == 2 and "FIT_SPEED='fast'" in r.stderr
    # a rerun keeps the first run's fitted sizes (whatever FIT and the speed say now); given wins
    (tmp_path / "runs" / "default").mkdir(parents=True)
    (tmp_path / "runs" / "default" / "sizes.env").write_text("NUM_IMAGES=3000\nDIRTY_IMAGES=6500\n")
    for env in ({"FIT_SPEED": str(speed * 3)}, {"FIT": "0"}):
        r = _run(tmp_path, "--plan", **env)
        assert r.stdout.rstrip().endswith("NUM_IMAGES=3000 DIRTY_IMAGES=6500"), r.stdout
    r = _run(tmp_path, "--plan", NUM_IMAGES="7000")
    assert r.stdout.rstrip().endswith("NUM_IMAGES=7000 DIRTY_IMAGES=6500"), r.stdout


def test_plan_measures_the_speed(tmp_path):
    r = _run(tmp_path, "--plan", THREADS="1")
    assert r.returncode == 0, r.stderr
    speed = r.stdout.split("training at ")[1].split(" images/s")[0]
    assert speed.isdigit() and int(speed) > 0
    # the sizes follow from the measured speed exactly as from the same speed given
    given = _run(tmp_path, "--plan", THREADS="1", FIT_SPEED=speed)
    assert given.stdout == r.stdout
