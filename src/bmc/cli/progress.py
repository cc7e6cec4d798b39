"""Rich progress bars for training: epochs, batches, live loss, accuracy and images/s (on stderr)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RichTrainProgress:
    def __init__(self) -> None:
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.epochs_task = None
        self.batches_task = None

    def start(self, run_dir: Path, config, first_epoch: int) -> None:
        verb = "resuming" if first_epoch else "training"
        self.console.print(
            f"{verb} {config.model} on {config.data.name} -> {run_dir} "
            f"(batch {config.batch_size}, lr {config.lr:g}, {config.optimizer}, {config.schedule})"
        )
        self.progress.start()
        self.epochs_task = self.progress.add_task("epochs ", total=config.epochs, completed=first_epoch, status="")
        self.batches_task = self.progress.add_task("batches", total=1, status="")

    def start_epoch(self, epoch: int, total_epochs: int, batches: int) -> None:
        self.progress.reset(self.batches_task, total=batches, status="")

    def batches_done(self, done: int, loss: float, accuracy: float | None, img_per_s: float) -> None:
        accuracy_text = f" acc {accuracy:.3f}" if accuracy is not None else ""
        self.progress.update(self.batches_task, completed=done, status=f"loss {loss:.4f}{accuracy_text} {img_per_s:,.0f} img/s")

    def end_epoch(self, metrics: dict) -> None:
        if "test_accuracy" in metrics:
            test = f"test acc {metrics['test_accuracy']:.4f} loss {metrics['test_loss']:.4f}"
        else:
            test = f"test MSE {metrics['test_mse']:.2f} R² {metrics['test_r2']:.3f}"
        self.progress.update(self.epochs_task, completed=metrics["epoch"], status=test)
        self.progress.console.print(
            f"epoch {metrics['epoch']:>3}: train loss {metrics['train_loss']:.4f}, {test}, "
            f"{metrics['img_per_s']:,.0f} img/s, {metrics['seconds']:.1f} s"
        )

    def close(self) -> None:
        if self.epochs_task is not None:
            self.progress.stop()
