"""Saving and loading trained models: safetensors weights plus bmc.json, never pickle.

A checkpoint is committed in three atomic renames: train_state (weights + optimizer + history, all
that --resume needs, in one self-consistent file), then model.safetensors, then bmc.json. A kill
between them leaves either the old or the new train_state, never a mix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from bmc import __version__
from bmc.artifact import (
    META_FORMAT_VERSION,
    RUN_META,
    TRAIN_STATE,
    WEIGHTS,
    atomic_write_json,
    load_tensors,
    read_meta,
    run_file_path,
    save_tensors,
)
from bmc.errors import CheckpointError

MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."


def save_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, meta: dict) -> dict:
    """Write the run's weights, resume state (when optimizer is given) and bmc.json; returns the meta written."""
    state = model.state_dict()
    if optimizer is not None:
        resume_tensors = {MODEL_PREFIX + k: v for k, v in state.items()}
        resume_tensors.update(_flatten_optimizer(optimizer))
        save_tensors(
            run_dir / TRAIN_STATE,
            resume_tensors,
            metadata={
                "completed_epochs": str(meta["completed_epochs"]),
                "history": json.dumps(meta["history"]),
                "param_groups": json.dumps(_param_groups(optimizer)),
            },
        )
    digest = save_tensors(run_dir / WEIGHTS, state)
    meta = {**meta, "format_version": META_FORMAT_VERSION, "bmc_version": __version__}
    meta["weights"] = {"file": WEIGHTS, "sha256": digest, "bytes": (run_dir / WEIGHTS).stat().st_size}
    atomic_write_json(run_dir / RUN_META, meta)
    return meta


@dataclass
class ResumeState:
    completed_epochs: int
    history: list[dict]
    model_state: dict
    optimizer_tensors: dict
    param_groups: list[dict]


def load_resume_state(run_dir: Path) -> ResumeState:
    """Read RUN_DIR/train_state.safetensors, the state of the last complete epoch."""
    from safetensors import safe_open

    path = Path(run_dir) / TRAIN_STATE
    if not path.is_file():
        raise CheckpointError(f"{path}: no resume state (the run finished, or never completed an epoch)")
    tensors = load_tensors(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return ResumeState(
            completed_epochs=int(metadata["completed_epochs"]),
            history=json.loads(metadata["history"]),
            model_state={k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)},
            optimizer_tensors={k: v for k, v in tensors.items() if k.startswith(OPTIM_PREFIX)},
            param_groups=json.loads(metadata["param_groups"]),
        )
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: resume state lacks {exc}") from None


def restore_optimizer(optimizer: torch.optim.Optimizer, state: ResumeState) -> None:
    """Put the saved momentum buffers / Adam moments back into a freshly built optimizer."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    restored: dict[int, dict] = {}
    for key, tensor in state.optimizer_tensors.items():
        _, index, name = key.split(".", 2)
        restored.setdefault(int(index), {})[name] = tensor
    for index, entries in restored.items():
        if index >= len(params):
            raise CheckpointError(f"resume state has optimizer entries for parameter {index}; the model has {len(params)}")
        param = params[index]
        param_state = {}
        for name, value in entries.items():
            if name != "step" and value.shape == param.shape:
                # Same strides as the parameter (channels_last for convolutions): fused optimizer
                # kernels walk parameter, gradient and state as one flat layout.
                value = torch.empty_like(param).copy_(value)
            param_state[name] = value
        optimizer.state[param] = param_state
    for group, saved in zip(optimizer.param_groups, state.param_groups):
        group.update(saved)


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> dict:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    flat = {}
    for index, param in enumerate(params):
        for name, value in optimizer.state.get(param, {}).items():
            if torch.is_tensor(value):
                flat[f"{OPTIM_PREFIX}{index}.{name}"] = value.detach().cpu()
            else:
                flat[f"{OPTIM_PREFIX}{index}.{name}"] = torch.tensor(value)
    return flat


def _param_groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    return [
        {k: v for k, v in group.items() if k != "params" and isinstance(v, (int, float, bool, str, type(None), list, tuple))}
        for group in optimizer.param_groups
    ]


def load_state_into(model: torch.nn.Module, state: dict, source: Path) -> None:
    """Load a state dict, naming the file and the first mismatch when it does not fit the model."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise CheckpointError(f"{source}: weights do not match the architecture in {RUN_META} ({detail})")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: weights do not match the architecture in {RUN_META} "
                f"({key}: {list(tensor.shape)} in the file, {list(expected[key].shape)} in the model)"
            )
    model.load_state_dict(state)


def load_model(run_dir: Path) -> tuple[torch.nn.Module, dict]:
    """The trained model of RUN_DIR (eval mode, CPU) and its bmc.json."""
    from bmc.models import create_model

    run_dir = Path(run_dir)
    meta = read_meta(run_dir)  # checked against its schema: types, bounds, a hash, a file inside the run
    model_meta = meta["model"]
    weights = meta["weights"]
    weights_path = run_file_path(run_dir, weights["file"])
    model = create_model(
        model_meta["name"], tuple(model_meta["data_input_shape"]), model_meta["num_classes"], check=False, **model_meta["args"]
    )
    state = load_tensors(weights_path, expected_sha256=weights["sha256"])
    if model_meta.get("dropped_blocks"):
        from bmc.models.blocks import drop_blocks

        drop_blocks(model, [tuple(block) for block in model_meta["dropped_blocks"]])
    if model_meta.get("pruned"):
        shrink_to_state(model, state)
    load_state_into(model, state, weights_path)
    return model.eval(), meta


def shrink_to_state(model: torch.nn.Module, state: dict) -> torch.nn.Module:
    """Resize conv, BN and linear layers in place to the shapes a pruned model's state dict holds.

    A pruned run is saved as its registry architecture plus weights of smaller shapes; loading
    rebuilds the architecture and shrinks each layer to the saved shape before loading the weights.
    """
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        weight = state.get(prefix + "weight")
        if weight is None:
            continue
        if isinstance(module, torch.nn.Conv2d) and tuple(weight.shape) != tuple(module.weight.shape):
            out_channels, in_per_group = weight.shape[0], weight.shape[1]
            depthwise = module.groups == module.in_channels and module.groups > 1
            module.out_channels = out_channels
            module.groups = out_channels if depthwise else module.groups
            module.in_channels = in_per_group * module.groups
            module.weight = torch.nn.Parameter(torch.empty_like(weight))
            if module.bias is not None:
                module.bias = torch.nn.Parameter(torch.empty(out_channels))
        elif isinstance(module, torch.nn.BatchNorm2d) and weight.shape[0] != module.num_features:
            features = weight.shape[0]
            module.num_features = features
            module.weight = torch.nn.Parameter(torch.empty(features))
            module.bias = torch.nn.Parameter(torch.empty(features))
            module.register_buffer("running_mean", torch.zeros(features))
            module.register_buffer("running_var", torch.ones(features))
        elif isinstance(module, torch.nn.Linear) and tuple(weight.shape) != tuple(module.weight.shape):
            module.out_features, module.in_features = weight.shape
            module.weight = torch.nn.Parameter(torch.empty_like(weight))
            if module.bias is not None:
                module.bias = torch.nn.Parameter(torch.empty(weight.shape[0]))
    return model
