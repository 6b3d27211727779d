"""Crash safety: a run killed (SIGKILL), interrupted (Ctrl-C) or terminated (SIGTERM) mid-epoch resumes
to the same result: SIGKILL from the last epoch's end, Ctrl-C and SIGTERM from the step they stopped at."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import HANG_S, make_csv_dataset
from imgcls.config import TrainConfig
from imgcls.errors import Terminated, sigterm_as_interrupt
from imgcls.train import runner
from imgcls.train.optim import StepSchedule
from imgcls.train.run_folder import RunFolder
from imgcls.train.runner import fit

EPOCHS = 4
COMPARED = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")


def command(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "imgcls", "train", str(data), "--out", str(out), "--epochs", str(EPOCHS),
            "--batch-size", "8", "--precision", "fp32", "--seed", "3", "--no-channels-last"]


def environment() -> dict[str, str]:
    # One thread: the same reduction order in every process, so fp32 results can be compared closely.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_to_end(data: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command(data, out), env=environment(), capture_output=True, text=True, timeout=HANG_S)


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_and_stop_after_first_epoch(data: Path, out: Path, sig: int) -> subprocess.CompletedProcess:
    """Start training, wait until epoch 1 is on disk, then send `sig` while epoch 2 runs."""
    # The child gets Ctrl-C as a terminal gives it: a test runner started as a shell's background job
    # (`make test &`, nohup) passes SIGINT on ignored, and imgcls rightly leaves an ignored signal alone.
    proc = subprocess.Popen(command(data, out), env=environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"training ended before it could be stopped: {proc.communicate()}"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=HANG_S)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 40 images per class in batches of 8: 13 steps an epoch, long enough to be stopped inside one.
    return make_csv_dataset(tmp_path_factory.mktemp("resume") / "ds", n_per_class=40) / "train"


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    done = run_to_end(data, out)
    assert done.returncode == 0, done.stderr
    return out


def max_weight_diff(a: Path, b: Path) -> float:
    """Largest absolute difference over every tensor of two model files (same keys required)."""
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


def assert_same_run(resumed: Path, reference: Path, report) -> None:
    """Weights, optimizer state and per-epoch metrics equal the uninterrupted run's."""
    weights = max_weight_diff(resumed, reference)
    ca = torch.load(resumed / "checkpoint.pt", weights_only=True)
    cb = torch.load(reference / "checkpoint.pt", weights_only=True)
    last = max((ca["model"][k].double() - cb["model"][k].double()).abs().max().item() for k in cb["model"])
    moments = max((sa[key].double() - sb[key].double()).abs().max().item()
                  for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values())
                  for key in ("exp_avg", "exp_avg_sq"))
    ma = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in ma] == list(range(1, EPOCHS + 1))
    metric_diff = max(abs(x[k] - y[k]) for x, y in zip(ma, mb) for k in COMPARED)
    report(f"max |diff|: best weights {weights:.2e}, last weights {last:.2e}, "
           f"Adam moments {moments:.2e}, metrics {metric_diff:.2e}")
    assert weights <= 1e-5 and last <= 1e-5 and moments <= 1e-5
    assert metric_diff <= 1e-4
    assert ca["step"] == cb["step"] and ca["best_epoch"] == cb["best_epoch"]
    assert json.loads((resumed / "run.json").read_text())["status"] == "complete"
    assert not list(resumed.glob(".*.tmp"))


@pytest.fixture
def report(request: pytest.FixtureRequest):
    terminal = request.config.pluginmanager.get_plugin("terminalreporter")
    return lambda line: terminal.write_line(f"\n[{request.node.name}] {line}") if terminal else print(line)


def test_sigkill_mid_epoch_then_rerun_equals_uninterrupted(data: Path, reference: Path, tmp_path: Path,
                                                          report) -> None:
    out = tmp_path / "run"
    killed = start_and_stop_after_first_epoch(data, out, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) < EPOCHS and not (out / "run.json").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == len(lines)
    report(f"SIGKILL landed with {len(lines)} of {EPOCHS} epochs on disk")
    resumed = run_to_end(data, out)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after epoch {len(lines)}" in resumed.stdout
    assert_same_run(out, reference, report)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_saves_says_how_to_resume_and_exits_with_its_code(data: Path, reference: Path, tmp_path: Path,
                                                                       report, sig, code) -> None:
    """Ctrl-C, and what kill, systemd, Kubernetes and CI send: the same saved state and hint."""
    out = tmp_path / "run"
    stopped = start_and_stop_after_first_epoch(data, out, sig)
    assert stopped.returncode == code == 128 + sig, stopped.stderr
    assert "interrupted" in stopped.stdout and "run the same command again" in stopped.stdout
    assert "Traceback" not in stopped.stderr
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    # Most often the signal lands inside a step of epoch 2 and that epoch is saved up to the step.
    inside = f" and step {saved['position']['steps']} of 13 of epoch {saved['epoch'] + 1}" if saved["position"] else ""
    assert saved["epoch"] >= 1 and f"epochs 1-{saved['epoch']}{inside} are saved" in stopped.stdout
    report(f"stopped {'inside epoch ' + str(saved['epoch'] + 1) if inside else 'at an epoch boundary'}")
    assert not (out / "run.json").exists() and not list(out.glob(".*.tmp"))
    resumed = run_to_end(data, out)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, reference, report)


def test_torn_temp_files_from_a_kill_are_removed_on_resume(data: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "run.json").unlink()
    torn = out / ".checkpoint.pt.abc123.tmp"
    torn.write_bytes(b"half a checkpoint")
    done = run_to_end(data, out)
    assert done.returncode == 0, done.stderr
    assert not torn.exists() and max_weight_diff(out, reference) == 0.0


# In-process stops inside an epoch: the signal is sent at a chosen optimizer step, so where the run
# stops is a step count, not a matter of the machine's speed.
STOP_AT_STEP = 21  # the 6th step of epoch 2 (16 steps an epoch)


@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt, as in a terminal (a shell's background job ignores it)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def tiny_config(data: Path) -> TrainConfig:
    # Dropout (0.2 in scratch-cnn-tiny) and every random augmentation: both streams must be restored.
    return TrainConfig(data_dir=str(data), model="scratch-cnn-tiny", epochs=3, batch_size=2, precision="fp32",
                       channels_last=False, augment="flip-shift-erase", lr=2e-3, seed=5)


def signal_at_step(monkeypatch: pytest.MonkeyPatch, sig: int, step: int) -> None:
    """The signal arrives while optimizer step `step` (0-based, over the run) is under way."""

    class SignalledSchedule(StepSchedule):
        def __call__(self) -> None:
            if self.step == step:
                os.kill(os.getpid(), sig)
            super().__call__()

    monkeypatch.setattr(runner, "StepSchedule", SignalledSchedule)


def checkpoints_equal(a: Path, b: Path) -> None:
    ca = torch.load(a / "checkpoint.pt", weights_only=True)
    cb = torch.load(b / "checkpoint.pt", weights_only=True)
    assert ca["model"].keys() == cb["model"].keys()
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in cb["model"])
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert ca["step"] == cb["step"] and ca["best_epoch"] == cb["best_epoch"]
    assert ca["position"] is None and cb["position"] is None


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_inside_an_epoch_resumes_to_the_same_bits(csv_dataset: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, sig: int,
                                                        ctrl_c_raises) -> None:
    """The step under way finishes, the checkpoint holds the position inside the epoch, and the
    resumed run equals the uninterrupted one exactly: weights, Adam moments and every metric."""
    config = tiny_config(csv_dataset / "train")
    fit(config, tmp_path / "reference", log=lambda _: None)
    lines: list[str] = []
    signal_at_step(monkeypatch, sig, STOP_AT_STEP)
    with pytest.raises(KeyboardInterrupt) as stopped, sigterm_as_interrupt():
        fit(config, tmp_path / "run", log=lines.append)
    assert isinstance(stopped.value, Terminated) == (sig == signal.SIGTERM)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    # Epoch 1 done, and the 6 steps of epoch 2 up to and including the one the signal interrupted.
    assert saved["epoch"] == 1 and saved["position"]["steps"] == STOP_AT_STEP - 16 + 1
    assert "epochs 1-1 and step 6 of 16 of epoch 2 are saved" in lines[-1]
    assert "continue from epoch 2 step 7" in lines[-1]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    monkeypatch.undo()
    resumed: list[str] = []
    fit(config, tmp_path / "run", log=resumed.append)
    assert any("resuming at step 7 of 16 of epoch 2 of 3" in line for line in resumed)
    checkpoints_equal(tmp_path / "run", tmp_path / "reference")
    assert max_weight_diff(tmp_path / "run", tmp_path / "reference") == 0.0
    ma, mb = (RunFolder(tmp_path / name).read_metrics() for name in ("run", "reference"))
    assert [{k: m[k] for k in COMPARED} for m in ma] == [{k: m[k] for k in COMPARED} for m in mb]


def test_a_second_interrupt_stops_at_once(csv_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          ctrl_c_raises) -> None:
    """The first Ctrl-C waits for the step under way; a second one does not wait for anything."""

    class TwiceSignalled(StepSchedule):
        def __call__(self) -> None:
            if self.step == STOP_AT_STEP:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            super().__call__()

    monkeypatch.setattr(runner, "StepSchedule", TwiceSignalled)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_config(csv_dataset / "train"), tmp_path / "run", log=lambda _: None)
    # Nothing of epoch 2 was saved: the epoch-1 checkpoint stands, and resuming redoes epoch 2.
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["position"] is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
