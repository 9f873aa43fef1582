"""Runs that survive: signals, the --out lock, corrupt checkpoints, resume rules, with real
processes, real signals and real files (no mocks)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import psutil
import pytest

from autotune import plan as planmod
from autotune.errors import UserError
from autotune.runtime.checkpoint import checksum_problem
from autotune.runtime.rundir import read_log
from autotune.runtime.trainer import RunOptions, run
from autotune.workloads import load_workload
from tests.conftest import DEFAULT_PLAN, ROOT
from tests.strategy_suite import TINY


def write_plan(
    tmp_path: Path, *, nproc: int = 1, strategies: dict | None = None, name: str = "plan.json", **train_overrides
) -> Path:
    data = json.loads(DEFAULT_PLAN.read_text())
    if nproc > 1:
        data["workload"]["overrides"] = dict(TINY)
    data["train"].update({"eval_interval": 0, "checkpoint_interval": 10, "log_interval": 1, **train_overrides})
    data["launch"]["nproc_per_node"] = nproc
    data["strategies"] = [{"name": n, "knobs": k} for n, k in (strategies or {}).items()]
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def start(plan: Path, out: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "autotune", "run", str(plan), "--out", str(out), "--json", *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.01)


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_log(out / "log.jsonl")]


@pytest.mark.slow
def test_sigterm_to_a_two_process_run_stops_every_rank_at_one_step_and_resumes_exactly(tmp_path: Path) -> None:
    steps = 80  # the stop comes a step or two after step 10 (signal to torchrun to ranks)
    plan = write_plan(tmp_path, nproc=2, strategies={"ddp": {}})
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    proc = start(plan, stopped, "--steps", str(steps))
    wait_for(stopped / "checkpoints" / "step_00000010.pt", proc)
    tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    assert len(tree) >= 4  # autotune run, torchrun, 2 ranks
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)  # within torchrun's 30 s grace, start to end
    assert proc.returncode == 143, err[-3000:]
    for pid in tree:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, (
            f"pid {pid} left behind"
        )
    summary = json.loads((stopped / "summary.json").read_text())
    at = summary["steps_done"]
    assert summary["stopped"] == "SIGTERM" and 10 <= at < steps
    assert summary["checkpoint"] == str(stopped / "checkpoints" / f"step_{at:08d}.pt")
    assert (stopped / "checkpoints" / f"step_{at:08d}.pt.sha256").is_file()
    assert [r["step"] for r in read_log(stopped / "log.jsonl")] == list(range(at))
    assert err.strip().splitlines()[-1] == (
        f"autotune: stopped by SIGTERM at step {at}: checkpoint {summary['checkpoint']}, "
        f"summary {stopped / 'summary.json'}; continue with --resume"
    )

    ref = start(plan, straight, "--steps", str(steps))
    resumed = start(plan, stopped, "--steps", str(steps), "--resume")
    for p in (ref, resumed):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert [r["step"] for r in read_log(stopped / "log.jsonl")] == list(range(steps))
    assert losses(stopped) == losses(straight)  # bit for bit, as an uninterrupted run


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])  # a terminal's Ctrl-C, a dropped SSH session
def test_sigint_or_sighup_to_a_single_process_run_checkpoints_the_step_and_exits_128_plus_it(
    tmp_path: Path, signum: int
) -> None:
    plan = write_plan(tmp_path, checkpoint_interval=0)  # only the stop writes a checkpoint
    out = tmp_path / "run"
    proc = start(plan, out, "--steps", "100000")
    wait_for(out / "log.jsonl", proc)
    os.kill(proc.pid, signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    at, name = summary["steps_done"], signal.Signals(signum).name
    assert summary["stopped"] == name and len(summary["losses"]) == at
    assert (out / "checkpoints" / f"step_{at:08d}.pt").is_file()
    assert err.strip().splitlines()[-1].startswith(f"autotune: stopped by {name} at step {at}: checkpoint ")


def test_a_second_run_on_a_locked_out_is_refused_and_leaves_the_first_alone(tmp_path: Path) -> None:
    plan = write_plan(tmp_path, checkpoint_interval=0)
    out = tmp_path / "run"
    first = start(plan, out, "--steps", "100000")
    wait_for(out / "log.jsonl", first)
    second = start(plan, out, "--steps", "100000", "--resume")  # a resume would truncate the log
    _, err = second.communicate(timeout=60)
    assert second.returncode == 2
    assert err.strip() == (
        f"autotune: error: run directory {out} is in use by another autotune process "
        f"(pid {first.pid}; lock {out / '.lock'})"
    )
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 143, err[-3000:]
    at = json.loads((out / "summary.json").read_text())["steps_done"]
    assert [r["step"] for r in read_log(out / "log.jsonl")] == list(range(at))  # every step once, none lost


def flip_tensor_bytes(path: Path, n: int = 64) -> None:
    """Flip ``n`` bytes in the middle of the largest tensor stored in a torch.save archive."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with path.open("r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(at)
        data = bytearray(f.read(n))
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in data))


def small_plan(tmp_path: Path, **train_overrides) -> planmod.Plan:
    return planmod.load(write_plan(tmp_path, log_interval=5, **train_overrides))


def test_a_bit_flipped_checkpoint_is_named_and_the_older_one_is_used(tmp_path: Path, capsys) -> None:
    plan, out = small_plan(tmp_path), tmp_path / "run"
    run(plan, RunOptions(steps=20, out_dir=out))
    newest = out / "checkpoints" / "step_00000020.pt"
    flip_tensor_bytes(newest)
    capsys.readouterr()
    summary = run(plan, RunOptions(steps=20, out_dir=out, resume=True))
    err = capsys.readouterr().err
    assert err.splitlines()[-2:] == [
        f"autotune: checkpoint {newest} is corrupt (checksum mismatch): resuming from step_00000010.pt",
        f"autotune: resuming from step 10 ({out / 'checkpoints' / 'step_00000010.pt'})",
    ]
    assert summary.steps_done == 20 and len(summary.losses) == 10  # steps 10..19 again
    assert all(v == v and abs(v) < 100 for v in summary.losses)
    assert [r["step"] for r in read_log(out / "log.jsonl")] == list(range(20))


def test_resume_refuses_another_plan_naming_every_difference(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(small_plan(tmp_path), RunOptions(steps=10, out_dir=out))
    other = small_plan(tmp_path, lr=0.001, micro_batch_size=8)
    with pytest.raises(UserError) as e:
        run(other, RunOptions(steps=10, out_dir=out, resume=True, timing_warmup=0))
    assert str(e.value) == (
        f"checkpoint {out / 'checkpoints' / 'step_00000010.pt'} is of another run: "
        "lr 0.002 (checkpoint) vs 0.001 (plan); micro_batch_size 16 (checkpoint) vs 8 (plan) "
        "(resume with the plan and --steps it was made with, or use another --out)"
    )


def test_resume_without_a_checkpoint_starts_from_step_0_and_says_so(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    run(small_plan(tmp_path, checkpoint_interval=0), RunOptions(steps=3, out_dir=out))
    for p in (out / "checkpoints").iterdir():  # as a run that failed before its first checkpoint
        p.unlink()
    stale = [out / "checkpoints" / ".step_00000005.pt.abc.tmp", out / "checkpoints" / "step_00000005.pt.sha256"]
    for p in stale:
        p.write_text("left by a killed run")
    (out / "checkpoints" / ".step_00000005.tmp").mkdir()
    capsys.readouterr()
    summary = run(small_plan(tmp_path, checkpoint_interval=0), RunOptions(steps=3, out_dir=out, resume=True))
    assert f"autotune: no complete checkpoint in {out / 'checkpoints'}: starting from step 0" in capsys.readouterr().err
    assert summary.steps_done == 3 and len(summary.losses) == 3
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [0, 1, 2]  # truncated, then written again
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000003.pt",
        "step_00000003.pt.sha256",
    ]  # no stale file left


def test_resuming_a_finished_run_changes_nothing(tmp_path: Path, run_cli) -> None:
    plan, out = write_plan(tmp_path, log_interval=5), tmp_path / "run"
    assert run_cli("run", plan, "--out", out, "--steps", "10", "--json")[0] == 0
    before = {p: p.read_bytes() for p in (out / "summary.json", out / "log.jsonl")}
    code, _, err = run_cli("run", plan, "--out", out, "--steps", "10", "--resume")
    assert code == 0 and err.strip() == f"autotune: the run in {out} already reached step 10: nothing to do"
    assert {p: p.read_bytes() for p in before} == before


def test_steps_set_the_schedule_and_files_get_the_umask_mode(tmp_path: Path, run_cli, monkeypatch) -> None:
    # Plan steps 200, --steps 40: the last step trains at lr * min_lr_ratio, as a 40-step run.
    plan = write_plan(tmp_path, log_interval=5, checkpoint_interval=20)
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    try:
        code, _, err = run_cli("run", plan, "--steps", "40", "--json")
    finally:
        os.umask(old)
    assert code == 0, err
    (out,) = (tmp_path / "runs").iterdir()  # no --out: runs/<UTC time>-<random suffix>/
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", out.name)
    assert err.splitlines()[0] == f"autotune: writing the run to {Path('runs') / out.name}/"
    log = read_log(out / "log.jsonl")
    spec = planmod.load(plan).train
    assert log[-1]["step"] == 39 and log[-1]["lr"] == pytest.approx(spec.lr * spec.min_lr_ratio)
    for path in (
        out / "summary.json",
        out / "checkpoints" / "step_00000040.pt",
        out / "checkpoints" / "step_00000040.pt.sha256",
    ):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_missing_val_bin_is_refused_before_training(tmp_path: Path, run_cli) -> None:
    from autotune import data as datamod

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    plan = write_plan(tmp_path, eval_interval=10)
    default = Path(datamod.default_dataset(load_workload("tiny", {}).vocab_size))
    for name in os.listdir(default):
        if name != "val.bin":
            os.symlink(default / name, data_dir / name)
    code, _, err = run_cli("run", plan, "--out", tmp_path / "run", "--steps", "20", "--data", data_dir)
    assert code == 2
    assert err.strip().startswith(f"autotune: error: data {data_dir}: no val.bin there, and the plan evaluates")
    assert not (tmp_path / "run").exists()  # refused: not even the folder it would have made


def tree_of(proc: subprocess.Popen) -> tuple[list[int], list[psutil.Process]]:
    """The pids of a launched run (autotune run, torchrun, ranks) and its ranks, once both exist."""
    deadline = time.monotonic() + 60
    while True:
        children = psutil.Process(proc.pid).children(recursive=True)
        ranks = [c for c in children if c.ppid() != proc.pid]
        if len(ranks) == 2:
            return [proc.pid] + [c.pid for c in children], ranks
        assert time.monotonic() < deadline, children
        time.sleep(0.05)


def gone(pids: list[int], timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.slow
def test_ranks_die_with_a_sigkilled_launcher_and_a_resume_waits_for_the_last_one(tmp_path: Path) -> None:
    plan, out = write_plan(tmp_path, nproc=2, strategies={"ddp": {}}, checkpoint_interval=2), tmp_path / "run"
    proc = start(plan, out, "--steps", "100000")
    wait_for(out / "checkpoints" / "step_00000002.pt", proc)
    pids, ranks = tree_of(proc)
    try:
        for rank in ranks:  # frozen: they outlive their launcher for as long as this test wants
            rank.suspend()
        proc.kill()
        proc.wait(timeout=60)  # not communicate(): the frozen ranks hold its pipes open
        assert gone(pids[:2])  # autotune run and torchrun (PR_SET_PDEATHSIG)
        resume = subprocess.run(
            [sys.executable, "-m", "autotune", "run", str(plan), "--out", str(out), "--steps", "100000", "--resume"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert resume.returncode == 2, resume.stderr
        assert resume.stderr.startswith(
            f"autotune: error: run directory {out} is in use by another autotune process (pid {proc.pid}, "
        )
        assert len(resume.stderr.strip().splitlines()) == 1
        for rank in ranks:
            rank.resume()  # the death signal waits for them: SIGTERM, so a checkpoint, the summary, exit
        assert gone(pids)
    finally:
        for rank in ranks:
            if rank.is_running():
                rank.kill()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "SIGTERM" and summary["checkpoint"] == str(
        out / "checkpoints" / f"step_{summary['steps_done']:08d}.pt"
    )


@pytest.mark.slow
def test_sighup_to_a_launcher_and_sigterm_to_one_rank_stop_the_run_as_a_single_process_would(tmp_path: Path) -> None:
    plan = write_plan(tmp_path, nproc=2, strategies={"ddp": {}})
    for target, signum in (("launcher", signal.SIGHUP), ("rank 1", signal.SIGTERM)):
        out = tmp_path / target.replace(" ", "")
        proc = start(plan, out, "--steps", "100000")
        wait_for(out / "log.jsonl", proc)
        pids, ranks = tree_of(proc)
        os.kill(proc.pid if target == "launcher" else ranks[-1].pid, signum)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signum, err[-3000:]
        assert gone(pids)
        summary = json.loads((out / "summary.json").read_text())
        at, name = summary["steps_done"], signal.Signals(signum).name
        assert summary["stopped"] == name
        assert "Traceback" not in err and err.strip().splitlines()[-1] == (
            f"autotune: stopped by {name} at step {at}: checkpoint {summary['checkpoint']}, "
            f"summary {out / 'summary.json'}; continue with --resume"
        )


def test_a_full_disk_while_checkpointing_leaves_the_previous_pair_and_no_stray_file(tmp_path: Path) -> None:
    import resource

    plan, out = write_plan(tmp_path), tmp_path / "run"
    cmd = [sys.executable, "-m", "autotune", "run", str(plan), "--out", str(out), "--steps", "20", "--json"]
    run(planmod.load(plan), RunOptions(steps=20, stop_at=10, out_dir=out))
    ckpt = out / "checkpoints"
    limit = (ckpt / "step_00000010.pt").stat().st_size // 2  # room for the log, not for a checkpoint

    def small_disk() -> None:  # a real EFBIG from the kernel at the next checkpoint's write
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    resumed = subprocess.run([*cmd, "--resume"], cwd=ROOT, capture_output=True, text=True, preexec_fn=small_disk)
    assert resumed.returncode == 1, resumed.stderr
    assert resumed.stderr.strip().splitlines()[-1].startswith("autotune: error: cannot write ")
    assert "Traceback" not in resumed.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000010.pt", "step_00000010.pt.sha256"]
    assert checksum_problem(ckpt / "step_00000010.pt") is None
