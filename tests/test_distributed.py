"""torchrun with 2 gloo processes on CPU: disjoint shards, the single-process result, one run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ddp_support
from conftest import HANG_S, make_csv_dataset
from imgcls.config import TrainConfig
from imgcls.data import load_dataset
from imgcls.data.batches import epoch_generator, iterate_batches
from imgcls.data.split import stratified_split
from imgcls.errors import ImgclsError
from imgcls.models import create_model
from imgcls.train.checkpoint import load_checkpoint
from imgcls.train.distributed import SHARD_LOG_ENV, Dist, shard, shard_bounds
from imgcls.train.runner import fit

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
BATCH, EPOCHS = 16, 2


def test_shards_are_disjoint_ordered_and_cover_everything() -> None:
    for n in (0, 1, 7, 16, 33):
        for world in (1, 2, 3, 4):
            parts = [shard(torch.arange(n), r, world) for r in range(world)]
            assert torch.equal(torch.cat(parts), torch.arange(n))  # disjoint, in order, nothing lost
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1
    assert shard_bounds(16, 1, 2) == (8, 16)


def test_global_batch_must_split_evenly_over_processes() -> None:
    Dist(rank=0, world_size=2).check_batch_size(16)
    with pytest.raises(ImgclsError, match="global batch"):
        Dist(rank=0, world_size=2).check_batch_size(15)


def torchrun(args: list[str], tmp_path: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "IMGCLS_HOME": str(tmp_path / "imgcls_home"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]), **(extra_env or {})}
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", *args]  # standalone: a free local port
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def expected_batches(data_dir: Path, config: TrainConfig, epoch: int) -> list[list[int]]:
    """The global batches a single process trains on in `epoch` (dataset positions)."""
    data = load_dataset(data_dir)
    train_np, _ = stratified_split(data.targets.numpy(), config.val_fraction, config.seed)
    train_idx = torch.from_numpy(train_np)
    batches = iterate_batches(torch.arange(len(data.targets)), None, config.batch_size, shuffle=True,
                              generator=epoch_generator(config.seed, epoch), drop_last=True, indices=train_idx)
    return [idx.tolist() for idx, _ in batches]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture
def plan(tmp_path: Path) -> dict:
    """Four runs of the dropout-free model: scratch, head (cached features), finetune, interrupted scratch."""
    ddp_support.register()
    data = make_csv_dataset(tmp_path / "ds", n_per_class=24) / "train"
    weights = tmp_path / "start.safetensors"
    torch.manual_seed(123)
    save_file(create_model(ddp_support.MODEL, num_classes=3, in_chans=1).state_dict(), str(weights))
    base = dict(data_dir=str(data), model=ddp_support.MODEL, epochs=EPOCHS, batch_size=BATCH, lr=0.01,
                augment="none", precision="fp32", channels_last=False)
    configs = {"scratch": base,
               "head": {**base, "strategy": "head", "weights": str(weights)},
               "finetune": {**base, "strategy": "finetune", "weights": str(weights), "warmup_epochs": 1,
                            "backbone_lr_mult": 0.5},
               "resumed": base}
    return {"data": data, "configs": configs}


def test_two_processes_train_disjoint_shards_to_the_single_process_model(tmp_path: Path, plan: dict) -> None:
    entries = [{"config": cfg, "out": str(tmp_path / "ddp" / name), "shards": str(tmp_path / "shards" / name),
                **({"interrupt_at": 1} if name == "resumed" else {})} for name, cfg in plan["configs"].items()]
    (tmp_path / "plan.json").write_text(json.dumps(entries))
    torchrun([str(ROOT / "tests" / "ddp_support.py"), str(tmp_path / "plan.json")], tmp_path)

    for name, cfg in plan["configs"].items():
        single = tmp_path / "single" / name
        fit(TrainConfig(**cfg), single, device="cpu", log=lambda _: None)
        ddp = tmp_path / "ddp" / name
        # Only rank 0 wrote: the same files as one process, each metrics line once.
        assert sorted(os.listdir(ddp)) == sorted(os.listdir(single)), name
        metrics = [json.loads(line) for line in (ddp / "metrics.jsonl").read_text().splitlines()]
        assert [m["epoch"] for m in metrics] == list(range(1, EPOCHS + 1)), name
        assert json.loads((ddp / "run.json").read_text())["world_size"] == 2
        # Same weights and the same (all-reduced) training and validation metrics.
        assert_same_weights(load_checkpoint(ddp / "checkpoint.pt")["model"],
                            load_checkpoint(single / "checkpoint.pt")["model"])
        single_metrics = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
        for m, s in zip(metrics, single_metrics):
            assert m["train_loss"] == pytest.approx(s["train_loss"], abs=2e-5), name
            assert (m["train_acc"], m["val_acc"]) == (s["train_acc"], s["val_acc"]), name
    assert sorted(os.listdir(tmp_path / "ddp")) == sorted(plan["configs"])

    # Each rank trained on its own half of every global batch of the single-process order.
    config = TrainConfig(**plan["configs"]["scratch"])
    logs = [[json.loads(line) for line in (tmp_path / "shards" / "scratch" / f"rank{r}.jsonl").open()]
            for r in (0, 1)]
    expected = [b for epoch in range(EPOCHS) for b in expected_batches(plan["data"], config, epoch)]
    assert len(logs[0]) == len(logs[1]) == len(expected) > 0
    for batch, mine0, mine1 in zip(expected, *logs):
        assert mine0 == batch[:BATCH // 2] and mine1 == batch[BATCH // 2:]
    # The cached-feature head trains on gathered features, not on image batches.
    assert not (tmp_path / "shards" / "head").exists()


def test_torchrun_cli_trains_batchnorm_dropout_model_into_one_run_folder(tmp_path: Path) -> None:
    data = make_csv_dataset(tmp_path / "ds", n_per_class=24) / "train"
    out = tmp_path / "run"
    result = torchrun(["-m", "imgcls", "train", str(data), "--out", str(out), "--model", "scratch-cnn-tiny",
                       "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--lr", "0.01", "--augment",
                       "flip-shift"], tmp_path, {SHARD_LOG_ENV: str(tmp_path / "shards")})
    # Rank 0 alone prints: each line once.
    assert result.stdout.count("best validation accuracy") == 1
    assert result.stdout.count(f"epoch {EPOCHS}/{EPOCHS}:") == 1
    assert {p.name for p in tmp_path.iterdir()} - {"imgcls_home"} == {"ds", "run", "shards"}
    assert len((out / "metrics.jsonl").read_text().splitlines()) == EPOCHS
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    logs = [[json.loads(line) for line in (tmp_path / "shards" / f"rank{r}.jsonl").open()] for r in (0, 1)]
    assert len(logs[0]) == len(logs[1]) > 0
    steps = len(logs[0]) // EPOCHS
    for epoch in range(EPOCHS):
        ids = [i for r in (0, 1) for batch in logs[r][epoch * steps:(epoch + 1) * steps] for i in batch]
        assert len(ids) == len(set(ids)) == steps * BATCH  # each image once per epoch, on one rank


def test_torchrun_budgeted_run_agrees_on_the_schedule_mid_epoch(tmp_path: Path) -> None:
    """The early budget estimate is a collective at the same step on every rank: no hang, one plan."""
    data = make_csv_dataset(tmp_path / "ds", n_per_class=48) / "train"
    out = tmp_path / "run"
    torchrun(["-m", "imgcls", "train", str(data), "--out", str(out), "--model", "scratch-cnn-tiny",
              "--epochs", "500", "--time-budget", "4s", "--batch-size", "4", "--lr", "0.01"], tmp_path)
    info = json.loads((out / "run.json").read_text())
    assert 1 <= info["epochs"] < 500 and info["world_size"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == info["epochs"]
