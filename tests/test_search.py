"""finetune.py --search (Optuna): space, trials as ingredients, pruning, resume after a kill,
workers sharing one study, report/export, refusals; and DDP over two torchrun 'nodes'."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, make_patterns, write_idx

import finetune
import models
import train

optuna = pytest.importorskip("optuna")

FAST = ["--batch-size", "32", "--threads", "1", "--quiet", "--device", "cpu", "--amp", "none"]
# one method and one epoch count: trials stay short and cannot be duplicates of each other
SHORT = ["--no-freeze-backbone", "--epochs", "1"]


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> dict:
    """Tiny IDX data and a checkpoint trained on it (the start every trial fine-tunes)."""
    root = tmp_path_factory.mktemp("search")
    x, y = make_patterns(160, classes=4)
    write_idx(root / "tiny", "train", x[:120], y[:120])
    write_idx(root / "tiny", "t10k", x[120:], y[120:])
    args = ["--data", str(root / "tiny"), "--out", str(root / "runs"), "--name", "base"]
    args += ["--model", "smallnet_s", "--epochs", "1", "--lr", "0.05"]
    train.main([*args, *FAST, "--cache-dir", str(root / "cache")])
    return {"data": root / "tiny", "base": root / "runs" / "base" / "best.pt", "root": root}


def ft(start, out: Path, *extra: str, name: str = "ft"):
    args = ["--data", str(start["data"]), "--weights", str(start["base"]), "--out", str(out)]
    return finetune.main([*args, "--name", name, *FAST, *extra])


def load(out: Path, name: str = "ft", study: str = "search"):
    url = f"sqlite:///{(out / name / 'search.db').absolute()}"
    return optuna.load_study(study_name=study, storage=url)


def states(study) -> list[str]:
    return [t.state.name for t in study.get_trials(deepcopy=False)]


def epochs_logged(run: Path) -> list[int]:
    return [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------
# The space


def test_space_is_the_grids_and_flags_fix_dimensions():
    p = finetune.build_parser()
    args = p.parse_args(["--opt", "sgd"])
    space = finetune.search_space(args, set())
    dims = space["dims"]
    assert dims["lr"] == ["log", *finetune.LR_RANGE["sgd"]]
    assert dims["weight_decay"] == ["log", *finetune.WD_RANGE["sgd"]]
    assert dims["epochs"] == ["cat", [1, 2, 3, 4]]
    assert dims["aug"] == ["cat", list(finetune.GRID_AUGS)]
    assert dims["method"] == ["cat", ["full", "probe"]] and space["fixed"] == {}
    scaled = finetune.search_space(p.parse_args(["--epoch-scale", "4"]), set())
    assert scaled["dims"]["epochs"] == ["cat", [4, 8, 12, 16]]
    args = p.parse_args(["--aug", "crop", "--lr", "0.01", "--no-freeze-backbone"])
    fixed = finetune.search_space(args, {"aug", "lr", "freeze_backbone"})
    assert {"aug", "lr", "method"}.isdisjoint(fixed["dims"])
    assert fixed["fixed"] == {"aug": "crop", "lr": 0.01, "freeze_backbone": False}
    # method 'probe' is grid point 0 exactly; 'full' draws from the ranges
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"method": "probe"})
    probe = finetune.suggest(study.ask(), space, args)
    assert probe == finetune.grid_point(0)
    study.enqueue_trial({"method": "full", "mix": "none"})
    full = finetune.suggest(study.ask(), space, args)
    assert full["freeze_backbone"] is False and "mix_alpha" not in full
    assert 0.005 <= full["lr"] <= 0.05 and full["epochs"] in (1, 2, 3, 4)


# ---------------------------------------------------------------------------
# Trials, continuation, report and export


def test_search_trials_are_ingredients_and_search_continues(start, tmp_path, capsys):
    out = tmp_path / "runs"
    result = ft(start, out, "--search", "3", *SHORT)
    study = load(out)
    assert states(study) == ["COMPLETE"] * 3 and result["finished"] == 3
    for t in study.trials:
        run = Path(t.user_attrs["run_dir"])
        assert run == (out / "ft" / "search" / f"t{t.number}").absolute()
        assert {"best.pt", "last.pt", "metrics.jsonl", "summary.csv", "summary.json"} <= {
            p.name for p in run.iterdir()
        }
        ck = models.load_checkpoint(run / "best.pt")
        assert ck["metrics"]["val_acc"] == pytest.approx(t.value)
        assert ck["args"]["lr"] == pytest.approx(t.params["lr"])  # the trial's values trained
        assert ck["args"]["aug"] == t.params["aug"]
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == 3
    capsys.readouterr()
    ft(start, out, "--search", "4", *SHORT)  # the same study, one trial more
    assert [t.number for t in load(out).trials] == [0, 1, 2, 3]
    assert "trial 3 of search" in capsys.readouterr().out

    finetune.main(["--out", str(out), "--name", "ft", "--search-report"])
    report = capsys.readouterr().out
    for t in load(out).trials:
        assert re.search(rf"^\| {t.number} +\| {t.value:.4f} +\| complete", report, re.M)
    assert "lr=" in report and "importance" in report

    finetune.main(["--out", str(out), "--name", "ft", "--export-top", "2"])
    lines = capsys.readouterr().out.split()
    ranked = sorted(load(out).trials, key=lambda t: (-t.value, t.number))
    assert lines == [str(Path(t.user_attrs["run_dir"]) / "best.pt") for t in ranked[:2]]


def test_pruned_trial_stops_after_its_epoch(start, tmp_path, capsys):
    out = tmp_path / "runs"
    ft(start, out, "--search", "1", "--no-freeze-backbone", "--epochs", "2", "--pruner", "sha")
    study = load(out)
    # a finished trial that reached 200% after one epoch: every new trial is below it at rung 0
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE,
            value=2.0,
            intermediate_values={1: 2.0},
            system_attrs={"completed_rung_0": 2.0},  # how optuna's SHA records rung 0
        )
    )
    ft(start, out, "--search", "3", "--no-freeze-backbone", "--epochs", "2", "--pruner", "sha")
    study = load(out)
    assert states(study) == ["COMPLETE", "COMPLETE", "PRUNED"]
    pruned = Path(study.trials[2].user_attrs["run_dir"])
    assert epochs_logged(pruned) == [1]  # stopped at epoch 1 of 2
    assert not (pruned / "summary.json").exists()
    assert "pruned at epoch 1" in capsys.readouterr().out
    finetune.main(["--out", str(out), "--name", "ft", "--export-top", "5"])
    assert str(pruned) not in capsys.readouterr().out


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "IMGCLS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


def _worker(start, out: Path, storage: str, *extra: str) -> list[str]:
    cmd = [sys.executable, str(ROOT / "finetune.py"), "--data", str(start["data"])]
    cmd += ["--weights", str(start["base"]), "--out", str(out), "--name", "ft"]
    return [*cmd, "--storage", storage, "--study", "s", *FAST, *extra]


def test_killed_worker_trial_resumes_from_last_pt(start, tmp_path):
    """SIGKILL mid-trial (a machine lost): the next worker fails the silent trial after its
    heartbeat grace period and trains it on from its last.pt, in the same directory."""
    out = tmp_path / "runs"
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    extra = ["--search", "1", "--no-freeze-backbone", "--epochs", "20", "--heartbeat", "1"]
    cmd = _worker(start, out, storage, *extra, "--sched", "constant")
    proc = subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.PIPE, text=True)
    run = out / "ft" / "s" / "t0"
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (run / "last.pt").exists() and (run / "metrics.jsonl").exists()
    ):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = epochs_logged(run)
    assert done and done[-1] < 20, "the first trial ended before it could be killed"
    r = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming {run.absolute()}" in r.stdout
    assert epochs_logged(run) == list(range(1, 21))  # every epoch once, none redone from scratch
    study = optuna.load_study(study_name="s", storage=storage)
    assert states(study) == ["FAIL", "COMPLETE"]
    assert study.trials[1].user_attrs["run_dir"] == str(run.absolute())
    assert study.trials[1].params == study.trials[0].params


# ---------------------------------------------------------------------------
# More than one machine: search workers on one database, DDP through torchrun's rendezvous


def test_two_workers_share_one_sqlite_study(start, tmp_path):
    out = tmp_path / "runs"
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    cmd = _worker(start, out, storage, "--search", "4", *SHORT)
    procs = [
        subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    took = [set(map(int, re.findall(r"^trial (\d+) of s", log, re.M))) for log in logs]
    assert not took[0] & took[1]  # no trial trained by both
    study = optuna.load_study(study_name="s", storage=storage)
    # each worker stops once 4 are finished; both may have started one more at the same time
    assert 4 <= len(study.trials) <= 5 and set(states(study)) == {"COMPLETE"}
    assert took[0] | took[1] == {t.number for t in study.trials}
    for t in study.trials:
        assert epochs_logged(Path(t.user_attrs["run_dir"])) == [1]
    assert all(re.search(r"^search s: \d+ finished", log, re.M) for log in logs)


@pytest.mark.skipif(
    not os.environ.get("IMGCLS_TEST_DB_URL"),
    reason="set IMGCLS_TEST_DB_URL to a database server's SQLAlchemy URL to run it",
)
def test_search_on_a_database_server(start, tmp_path):
    """The multi-machine form: a server URL (e.g. postgresql+psycopg2://u:pw@host/db)."""
    url, study = os.environ["IMGCLS_TEST_DB_URL"], f"t{os.getpid()}_{time.time_ns()}"
    out = tmp_path / "runs"
    ft(start, out, "--search", "2", *SHORT, "--storage", url, "--study", study)
    trials = optuna.load_study(study_name=study, storage=url).trials
    assert states_of(trials) == ["COMPLETE", "COMPLETE"]
    assert all((Path(t.user_attrs["run_dir"]) / "best.pt").exists() for t in trials)
    optuna.delete_study(study_name=study, storage=url)


def states_of(trials) -> list[str]:
    return [t.state.name for t in trials]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_over_two_torchrun_nodes_c10d(start, tmp_path):
    """The two-node command lines of the README, both 'nodes' on this machine (loopback)."""
    out, port = tmp_path / "runs", _free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
        cmd += ["--nproc-per-node", "1", "--node-rank", str(node), "--rdzv-backend", "c10d"]
        cmd += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t"]
        cmd += [str(ROOT / "train.py"), "--data", str(start["data"]), "--out", str(out)]
        cmd += ["--name", "ddp", "--model", "smallnet_s", "--epochs", "2", "--batch-size", "16"]
        cmd += ["--threads", "1", "--quiet", "--device", "cpu"]
        procs.append(
            subprocess.Popen(
                cmd,
                env=_env(tmp_path),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=tmp_path,
            )
        )
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    run = out / "ddp"
    assert epochs_logged(run) == [1, 2]  # one writer: rank 0
    assert models.load_checkpoint(run / "last.pt")["resume_fingerprint"]["world_size"] == 2
    assert "".join(logs).count("epoch   2/2") == 1


# ---------------------------------------------------------------------------
# Refusals: one line, exit 2, nothing written


def _refused(capsys, fn, needle: str) -> str:
    with pytest.raises(SystemExit) as e:
        fn()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err
    return err


def test_bad_search_input_exit_2(start, tmp_path, capsys):
    out = tmp_path / "runs"
    _refused(capsys, lambda: ft(start, out, "--search", "2", "--i", "3"), "--i")
    _refused(
        capsys,
        lambda: ft(start, out, "--search", "2", "--storage", "postgresql://u@127.0.0.1:1/db"),
        "--storage",
    )
    _refused(
        capsys, lambda: ft(start, out, "--search", "2", "--storage", "nosuch://x"), "--storage"
    )
    blocker = tmp_path / "file"
    blocker.write_text("x")
    bad = f"sqlite:///{blocker / 'search.db'}"  # under a file: cannot be created
    _refused(capsys, lambda: ft(start, out, "--search", "2", "--storage", bad), "--storage")
    (tmp_path / "adir").mkdir()
    bad = f"sqlite:///{tmp_path / 'adir'}"
    _refused(capsys, lambda: ft(start, out, "--search", "2", "--storage", bad), "directory")
    _refused(capsys, lambda: ft(start, out, "--search-report"), "does not exist")
    assert not out.exists()
    if os.geteuid() != 0:  # root writes read-only files anyway
        ro = tmp_path / "ro.db"
        ro.write_bytes(b"")
        ro.chmod(0o444)
        _refused(
            capsys,
            lambda: ft(start, out, "--search", "2", "--storage", f"sqlite:///{ro}"),
            "writable",
        )


def test_study_with_another_space_is_refused(start, tmp_path, capsys):
    out = tmp_path / "runs"
    ft(start, out, "--search", "1", *SHORT, "--aug", "none")
    err = _refused(capsys, lambda: ft(start, out, "--search", "2", *SHORT), "another search space")
    assert "--study" in err
    ft(start, out, "--search", "1", *SHORT, "--study", "other")  # a new study name is fine
    assert len(load(out, study="other").trials) == 1
    # workers of one study must agree on the heartbeat (a shorter one fails live trials)
    beat = ["--study", "other", "--heartbeat", "5"]
    _refused(capsys, lambda: ft(start, out, "--search", "2", *SHORT, *beat), "--heartbeat 30")


def test_without_optuna_one_line(start, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    _refused(capsys, lambda: ft(start, tmp_path / "runs", "--search", "2"), "pip install optuna")
    assert not (tmp_path / "runs").exists()
