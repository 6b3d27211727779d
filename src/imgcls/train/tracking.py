"""Opt-in experiment tracking: each epoch's metrics mirrored to TensorBoard. The run folder's
metrics.jsonl stays the record; a tracker only shows it in a familiar viewer."""

from __future__ import annotations

from pathlib import Path

from imgcls.extras import require

TENSORBOARD_DIR = "tensorboard"  # inside the run folder: `tensorboard --logdir RUN/tensorboard`

# metrics.jsonl key -> TensorBoard tag: loss and accuracy of train and validation on one chart each.
SCALARS = {"train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "accuracy/train",
           "val_acc": "accuracy/val", "lr": "lr", "images_per_s": "images_per_s"}


class Tracker:
    """No tracking: what every tracker does, done by nothing."""

    def log_epoch(self, record: dict) -> None:
        """One epoch's line of metrics.jsonl."""

    def close(self) -> None:
        """Flush what is buffered."""


class TensorBoardTracker(Tracker):
    """Scalars per epoch (x axis: the epoch number) under RUN/tensorboard/."""

    def __init__(self, run_dir: Path):
        require("tensorboard", "--log tensorboard")  # torch.utils.tensorboard needs it
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))

    def log_epoch(self, record: dict) -> None:
        for key, tag in SCALARS.items():
            value = record.get(key)
            if value is not None:
                self.writer.add_scalar(tag, value, record["epoch"])
        self.writer.flush()  # an interrupted run keeps every epoch it logged

    def close(self) -> None:
        self.writer.close()


def open_tracker(name: str, run_dir: Path) -> Tracker:
    """The tracker for TrainConfig.tracking; 'none' tracks nothing."""
    if name == "tensorboard":
        return TensorBoardTracker(run_dir)
    return Tracker()
