"""The training loop: set-up, epochs of batches, evaluation, checkpoint. Read it top to bottom."""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch.nn import functional as F

from bmc.artifact import new_run_dir, point_latest_at, read_meta
from bmc.runtime.preprocess import eval_batch_size
from bmc.checkpoint import load_resume_state, load_state_into, restore_optimizer, save_checkpoint
from bmc.data import CLASSIFICATION, IMAGE, Dataset, load_dataset
from bmc.errors import CheckpointError, TrainingError, UsageError
from bmc.models import create_model, model_entry, model_input_shape
from bmc.models.blocks import dropped_blocks
from bmc.train.augment import Normalizer, epoch_batches
from bmc.train.config import TrainConfig, resolve_recipe
from bmc.train.distributed import Placement, all_reduce_sum, barrier, setup_placement, teardown

EVAL_BATCH = 1024
PROGRESS_EVERY_BATCHES = 10


class TrainProgress(Protocol):
    """What the loop reports while it runs (the CLI draws it with rich; tests pass nothing)."""

    def start(self, run_dir: Path, config: TrainConfig, first_epoch: int) -> None: ...
    def start_epoch(self, epoch: int, total_epochs: int, batches: int) -> None: ...
    def batches_done(self, done: int, loss: float, accuracy: float | None, img_per_s: float) -> None: ...
    def end_epoch(self, metrics: dict) -> None: ...


@dataclass
class Run:
    """A finished (or resumed and finished) training run."""

    run_dir: Path | None  # None on the non-main processes of a distributed run
    meta: dict

    @property
    def final_metrics(self) -> dict:
        return self.meta["history"][-1] if self.meta["history"] else {}

    def summary(self) -> dict:
        return {
            "run_dir": str(self.run_dir),
            "model": self.meta["model"]["name"],
            "dataset": self.meta["data"]["name"],
            "epochs": self.meta["completed_epochs"],
            "train_seconds": round(sum(e["seconds"] for e in self.meta["history"]), 3),
            **{k: v for k, v in self.final_metrics.items() if k.startswith("test_")},
            "weights_sha256": self.meta["weights"]["sha256"],
        }


def train(
    config: TrainConfig,
    progress: TrainProgress | None = None,
    resume: Path | None = None,
    initial_model: torch.nn.Module | None = None,
    teacher: torch.nn.Module | None = None,
    point_latest: bool = True,
) -> Run:
    """Train a model as config says (or continue the run in `resume`); returns the saved Run.

    initial_model starts from given weights and layer sizes (a pruned model being fine-tuned);
    teacher adds Hinton's distillation loss against its outputs. point_latest=False leaves
    runs/latest alone (fine-tuning inside `bmc compress` is not the user's newest run).
    """
    resume_state = None
    if resume is not None:
        resume = Path(resume)
        config = TrainConfig.from_dict(read_meta(resume)["config"])
        resume_state = load_resume_state(resume)

    placement = setup_placement(config.device, config.threads)
    try:
        return _train(config, placement, progress, resume, resume_state, initial_model, teacher, point_latest)
    finally:
        teardown(placement)


def _train(config, placement: Placement, progress, resume_dir, resume_state, initial_model, teacher, point_latest) -> Run:
    # ---- set-up: data, recipe, model, optimizer; every device and precision decision is made here
    dataset = load_dataset(config.data)
    config = resolve_recipe(config, dataset.name, dataset.task, dataset.default_model)
    if config.batch_size % placement.world_size:
        raise UsageError(f"--batch-size {config.batch_size} must divide by the {placement.world_size} processes")
    device = placement.device
    classification = dataset.task == CLASSIFICATION
    local_batch = config.batch_size // placement.world_size
    precision = _choose_precision(config.precision, device, model_entry(config.model).conv_net, local_batch)
    # At tiny batches oneDNN's per-call set-up outweighs its faster kernels; PyTorch's native
    # convolutions in NCHW run a batch-4 step 14% faster (seed-cifar-cnn: 3,179 vs 2,789 img/s).
    native_kernels = device.type == "cpu" and local_batch < 16
    if device.type == "cuda":
        # Every step has the same shapes, so cuDNN's one-off search for the fastest kernels pays for
        # itself within the first epoch; CPU runs, where resume is bit-exact, are unaffected.
        torch.backends.cudnn.benchmark = True
    channels_last = config.channels_last and dataset.layout == IMAGE and not native_kernels
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    torch.manual_seed(config.seed)
    if initial_model is not None:
        model = copy.deepcopy(initial_model).train()
    else:
        model = create_model(config.model, dataset.input_shape, dataset.num_classes, **config.model_args)
    if teacher is not None:
        # Moved in place, not copied: the teacher only runs forward under no_grad, and a copy of
        # seed-cnn224 (1.6 GB in fp32) pushed compress past 12 GiB (12.1 measured).
        teacher = teacher.eval().to(device=device, memory_format=memory_format)
    if resume_state is not None:
        load_state_into(model, resume_state.model_state, resume_dir)
    model = model.to(device=device, memory_format=memory_format)
    optimizer = _make_optimizer(model, config)
    if resume_state is not None:
        restore_optimizer(optimizer, resume_state)
    trained_model = model
    if placement.distributed:
        trained_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    compile_mode = _compile_mode(config.compile_mode, device, placement.distributed) if config.compile else None
    if compile_mode is not None:
        trained_model = torch.compile(trained_model, mode=compile_mode)
    # CUDA graphs reuse their output memory: each step is declared new, so nothing of the last
    # step's replay is read after the next one overwrote it.
    graphed_steps = compile_mode == "reduce-overhead" and device.type == "cuda"
    # bf16 keeps fp32's range, so it needs no loss scaling; fp16 (GPUs without bf16) does.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    resized = model_input_shape(config.model, dataset.input_shape)
    normalizer = Normalizer(
        dataset.normalization, dataset.layout == IMAGE, tuple(resized[1:]) if resized != dataset.input_shape else None
    ).to(device)
    # The whole data set lives on the training device: no loader, no per-sample Python.
    train_x = torch.from_numpy(dataset.train_x).to(device)
    train_y = torch.from_numpy(dataset.train_y).to(device)
    test_x = torch.from_numpy(dataset.test_x).to(device)
    test_y = torch.from_numpy(dataset.test_y).to(device)

    # Sized by what the model sees (after any resize): 300 test images at 224 px in one batch made
    # seed-cnn224's training and fine-tuning peak at 12.7 GiB.
    eval_batch = eval_batch_size(math.prod(resized), EVAL_BATCH)
    steps_per_epoch = max(1, len(train_y) // config.batch_size)  # the last partial batch is dropped
    total_steps = steps_per_epoch * config.epochs

    if resume_dir is not None:
        run_dir = resume_dir
        first_epoch, history = resume_state.completed_epochs, resume_state.history
        if first_epoch >= config.epochs:
            raise CheckpointError(f"{run_dir}: all {config.epochs} epochs are already complete")
    else:
        run_dir = _make_run_dir(config, placement)
        first_epoch, history = 0, []
    meta = _describe_run(config, dataset, model, precision, device, placement)
    meta["model"]["pruned"] = initial_model is not None
    meta["model"]["dropped_blocks"] = dropped_blocks(model)
    meta["model"]["distilled"] = teacher is not None
    meta["environment"]["compile_mode"] = compile_mode
    if progress and placement.is_main:
        progress.start(run_dir, config, first_epoch)

    # ---- the loop
    with _onednn_enabled(not native_kernels):
        for epoch in range(first_epoch, config.epochs):
            # Every epoch reseeds from (seed, epoch): a resumed run draws exactly what an uninterrupted one would.
            torch.manual_seed(config.seed * 100_003 + epoch)
            generator = torch.Generator(device=device).manual_seed(config.seed * 100_003 + epoch)
            order = torch.randperm(len(train_y), generator=generator, device=device)
            trained_model.train()
            if progress and placement.is_main:
                progress.start_epoch(epoch + 1, config.epochs, steps_per_epoch)
            epoch_start = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            correct_sum = torch.zeros((), device=device)
            seen = 0
            batches = epoch_batches(
                train_x,
                train_y,
                order,
                config.batch_size,
                slice(placement.rank * local_batch, (placement.rank + 1) * local_batch),
                dataset.augmentation if dataset.layout == IMAGE else None,
                normalizer,
                generator,
                memory_format,
            )
            for step, (inputs, targets) in enumerate(batches):
                if graphed_steps:
                    torch.compiler.cudagraph_mark_step_begin()
                lr = _learning_rate(config, epoch * steps_per_epoch + step, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    outputs = trained_model(inputs)
                loss = _loss(outputs.float(), targets, classification, config.label_smoothing)
                if teacher is not None:
                    with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                        teacher_outputs = teacher(inputs)
                    soft = _distillation_loss(outputs.float(), teacher_outputs.float(), config.kd_temperature)
                    loss = (1 - config.kd_alpha) * loss + config.kd_alpha * soft
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()

                loss_sum += loss.detach() * len(targets)
                if classification:
                    correct_sum += (outputs.detach().argmax(1) == targets).sum()
                seen += len(targets)
                if progress and placement.is_main and ((step + 1) % PROGRESS_EVERY_BATCHES == 0 or step + 1 == steps_per_epoch):
                    elapsed = time.perf_counter() - epoch_start
                    progress.batches_done(
                        step + 1,
                        float(loss_sum) / seen,
                        float(correct_sum) / seen if classification else None,
                        seen * placement.world_size / max(elapsed, 1e-9),
                    )

            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the steps above were only queued; count them finished
            train_seconds = time.perf_counter() - epoch_start
            totals = all_reduce_sum(torch.stack([loss_sum, correct_sum, torch.tensor(float(seen), device=device)]), placement)
            if not torch.isfinite(totals[0]):
                # Saving would overwrite the last good checkpoint with NaN weights that every later
                # stage (export, calibration) would choke on far from the cause.
                raise TrainingError(
                    f"training diverged in epoch {epoch + 1}: the loss is not finite (lr {config.lr:g}, {precision}); lower --lr"
                )
            metrics = {
                "epoch": epoch + 1,
                "lr_end": lr,
                "train_loss": round(float(totals[0] / totals[2]), 6),
                **({"train_accuracy": round(float(totals[1] / totals[2]), 6)} if classification else {}),
                **_evaluate(model, normalizer, test_x, test_y, classification, device, memory_format, placement, eval_batch),
                "seconds": round(train_seconds, 3),
                "img_per_s": round(float(totals[2]) / max(train_seconds, 1e-9), 1),
            }
            history.append(metrics)

            # ---- checkpoint, every epoch, on the main process only
            if placement.is_main:
                meta = save_checkpoint(
                    run_dir, model, optimizer, {**meta, "history": history, "completed_epochs": epoch + 1, "status": "running"}
                )
                if progress:
                    progress.end_epoch(metrics)
            barrier(placement)

    if placement.is_main:
        meta = save_checkpoint(run_dir, model, None, {**meta, "history": history, "completed_epochs": config.epochs, "status": "complete"})
        # A finished run needs no optimizer state; it is as large as the weights.
        (run_dir / "train_state.safetensors").unlink(missing_ok=True)
        if point_latest:
            point_latest_at(run_dir)
    barrier(placement)
    return Run(run_dir=run_dir, meta=meta)


def save_run(config: TrainConfig, model: torch.nn.Module, point_latest: bool = False) -> Run:
    """Save `model` as a finished run in config.out without training it, its test metrics measured
    (epoch 0 of its history); returns the Run. What `bmc compress --finetune-epochs 0` keeps of a
    pruned model: not one step, so not even BatchNorm's running statistics move."""
    dataset = load_dataset(config.data)
    config = resolve_recipe(config, dataset.name, dataset.task, dataset.default_model)
    placement, device = Placement(torch.device("cpu")), torch.device("cpu")
    model = copy.deepcopy(model).to(device).eval()
    resized = model_input_shape(config.model, dataset.input_shape)
    normalizer = Normalizer(
        dataset.normalization, dataset.layout == IMAGE, tuple(resized[1:]) if resized != dataset.input_shape else None
    ).to(device)
    metrics = _evaluate(
        model, normalizer, torch.from_numpy(dataset.test_x), torch.from_numpy(dataset.test_y), dataset.task == CLASSIFICATION,
        device, torch.contiguous_format, placement, eval_batch_size(math.prod(resized), EVAL_BATCH),
    )
    run_dir = _make_run_dir(config, placement)
    meta = _describe_run(config, dataset, model, "fp32", device, placement)
    meta["model"].update(pruned=True, dropped_blocks=dropped_blocks(model), distilled=False)
    meta["epochs"] = 0
    history = [{"epoch": 0, **metrics, "seconds": 0.0}]
    meta = save_checkpoint(run_dir, model, None, {**meta, "history": history, "completed_epochs": 0, "status": "complete"})
    if point_latest:
        point_latest_at(run_dir)
    return Run(run_dir=run_dir, meta=meta)


@contextlib.contextmanager
def _onednn_enabled(enabled: bool):
    # Not torch.backends.mkldnn.flags(): it also sets TF32 and warns about Intel GPUs on every call.
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


def _compile_mode(requested: str, device: torch.device, distributed: bool) -> str:
    if requested != "auto":
        return requested
    # A step of a CIFAR-sized ResNet-18 at batch 512 is bound by kernel launches: the H100 was busy
    # 44% of an eager step. Replayed as CUDA graphs it ran 72,252 img/s against 41,646 eager and
    # 37,838 compiled without graphs (benchmarks/train_throughput.py, BENCHMARKS.md). DDP's
    # gradient hooks do not belong in a graph, so distributed runs keep the default mode.
    return "reduce-overhead" if device.type == "cuda" and not distributed else "default"


def _choose_precision(requested: str, device: torch.device, conv_net: bool, local_batch: int) -> str:
    if requested != "auto":
        if requested == "fp16" and device.type == "cpu":
            raise UsageError("--precision fp16 needs a CUDA device; on CPU use bf16 or fp32")
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    # On CPUs with AMX or AVX-512 BF16, oneDNN's bf16 convolutions run about 2x faster than fp32
    # (measured: resnet20 1,200 vs 630 img/s on 2 cores). Elsewhere bf16 is emulated and slower, and
    # at tiny batches the casts cost more than they save (seed-cifar-cnn, batch 4: 2,365 vs 2,645 img/s).
    if conv_net and local_batch >= 32 and _cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


def _cpu_has_fast_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False


def _make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and normalization scales: decaying them only hurts (Goyal et al.).
    decayed = [p for p in model.parameters() if p.ndim > 1]
    not_decayed = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decayed, "weight_decay": config.weight_decay}, {"params": not_decayed, "weight_decay": 0.0}]
    # Fused kernels update every parameter in one call: at small batches the per-parameter Python
    # of the classic step is a measurable share of the step.
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True, fused=True)
    return torch.optim.AdamW(groups, lr=config.lr, fused=True)


def _learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """Linear warm-up to the peak, then linear (one-cycle) or cosine decay to zero."""
    warmup = max(1, int(config.warmup_fraction * total_steps))
    if step < warmup:
        return config.lr * (0.1 + 0.9 * step / warmup)
    progress = (step - warmup) / max(1, total_steps - warmup)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr * (1 - progress)


def _distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. (2015): KL between softened distributions, times T² so gradients keep their scale."""
    return F.kl_div(
        F.log_softmax(student / temperature, dim=1), F.log_softmax(teacher / temperature, dim=1), reduction="batchmean", log_target=True
    ) * temperature**2


def _loss(outputs: torch.Tensor, targets: torch.Tensor, classification: bool, label_smoothing: float) -> torch.Tensor:
    if classification:
        return F.cross_entropy(outputs, targets, label_smoothing=label_smoothing)
    return F.mse_loss(outputs.squeeze(-1), targets)


@torch.no_grad()
def _evaluate(model, normalizer, test_x, test_y, classification, device, memory_format, placement, batch: int) -> dict:
    """Test-split metrics in fp32, each process scoring its share: accuracy and loss, or MSE and R².

    fp32 even when training in bf16: the reported accuracy is then exactly what the exported fp32
    model scores in onnxruntime, not a bf16 approximation of it.
    """
    model.eval()
    share = torch.arange(placement.rank, len(test_y), placement.world_size, device=device)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.float64)
    target_sum = torch.zeros((), device=device, dtype=torch.float64)
    target_sq_sum = torch.zeros((), device=device, dtype=torch.float64)
    for start in range(0, len(share), batch):
        indices = share[start : start + batch]
        inputs = normalizer(test_x[indices]).contiguous(memory_format=memory_format)
        outputs = model(inputs).float()
        targets = test_y[indices]
        if classification:
            loss_sum += F.cross_entropy(outputs, targets, reduction="sum").double()
            correct += (outputs.argmax(1) == targets).sum()
        else:
            loss_sum += F.mse_loss(outputs.squeeze(-1), targets, reduction="sum").double()
            target_sum += targets.double().sum()
            target_sq_sum += (targets.double() ** 2).sum()
    count = torch.tensor(float(len(share)), device=device, dtype=torch.float64)
    totals = all_reduce_sum(torch.stack([loss_sum, correct, target_sum, target_sq_sum, count]), placement)
    loss_sum, correct, target_sum, target_sq_sum, count = (float(v) for v in totals)
    if classification:
        return {"test_loss": round(loss_sum / count, 6), "test_accuracy": round(correct / count, 6)}
    variance_sum = target_sq_sum - target_sum**2 / count
    return {"test_mse": round(loss_sum / count, 4), "test_r2": round(1 - loss_sum / max(variance_sum, 1e-12), 6)}


def _make_run_dir(config: TrainConfig, placement: Placement) -> Path | None:
    if not placement.is_main:
        return None  # only the main process writes
    if config.out is not None:
        out = Path(config.out)
        if out.exists() and any(out.iterdir()):
            raise UsageError(f"--out {out} exists and is not empty; choose a new directory or use --resume {out}")
        out.mkdir(parents=True, exist_ok=True)
        return out
    return new_run_dir(config.data.name, config.model)


def _describe_run(config, dataset: Dataset, model, precision, device, placement) -> dict:
    return {
        "kind": "train",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": config.model,
            "args": dict(config.model_args),
            "data_input_shape": list(dataset.input_shape),
            "input_shape": list(model_input_shape(config.model, dataset.input_shape)),
            "num_classes": dataset.num_classes,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "data": dataset.describe(),
        "config": config.to_dict(),
        "seed": config.seed,
        "environment": {
            "torch": torch.__version__,
            "device": str(device),
            "precision": precision,
            "processes": placement.world_size,
            "threads": torch.get_num_threads(),
        },
        "epochs": config.epochs,
    }


