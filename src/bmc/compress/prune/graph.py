"""Torch-Pruning's dependency graph: which layers shrink together, and channels physically removed.

Torch-Pruning (the DepGraph paper's library) groups the layers that must lose the same channels
through residual additions, concatenations, depthwise convolutions and the linear layer after a
flatten. Where it cannot build the whole model's graph, one graph per traceable part is built
instead, and a part may only change inside: its inputs and outputs keep their shapes.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from bmc.compress.prune.measure import trial_copy, trial_device
from bmc.errors import BmcError

# What Torch-Pruning raises on graphs it cannot follow (shufflenet_v2's channel shuffle: ZeroDivisionError).
TORCH_PRUNING_ERRORS = (RuntimeError, ValueError, ZeroDivisionError, KeyError, IndexError)
# The layers checkpoint.shrink_to_state resizes when a pruned run is loaded again.
REBUILDABLE_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


@dataclass(frozen=True)
class ChannelCut:
    """One pruning decision: these channels of this layer's group go."""

    scope: str  # the graph it was planned on: "" for the whole model, else the part's name
    layer: str  # the group's root module, by name
    pruning_fn: Callable  # Torch-Pruning's function (prune_conv_out_channels, ...)
    indices: tuple[int, ...]

    @property
    def group_key(self) -> tuple[str, str]:
        return self.layer, pruning_fn_name(self.pruning_fn)


def pruning_fn_name(pruning_fn: Callable) -> str:
    return getattr(pruning_fn, "__name__", str(pruning_fn))


def dependency_graph(module: nn.Module, args: tuple):
    """Torch-Pruning's dependency graph of module, traced on its positional inputs."""
    import torch_pruning as tp

    with torch_pruning_quiet():
        return tp.DependencyGraph().build_dependency(module, example_inputs=example_inputs(args))


def example_inputs(args: tuple):
    return args[0] if len(args) == 1 else args  # Torch-Pruning calls module(x) for one tensor, module(*args) for a tuple


@contextmanager
def torch_pruning_quiet() -> Iterator[None]:
    """Torch-Pruning warns of each raw parameter it meets (a Transformer's positions); what bmc
    leaves dense is in its report instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="torch_pruning")
        yield


def joins_residual_stream(group) -> bool:
    """Whether the group's channels are the outputs of several layers added together (a residual stream)."""
    producers = [
        dep.target.module
        for dep, _ in group
        if getattr(dep.handler, "__name__", "") == "prune_out_channels"
        and isinstance(dep.target.module, (nn.Conv2d, nn.Linear))
        and getattr(dep.target.module, "groups", 1) == 1
    ]
    return len(producers) > 1


def has_grouped_convolution(group) -> bool:
    """Whether a convolution of the group has groups of several channels (regnet's): only
    Torch-Pruning's own selection keeps every group of such a layer the same width."""
    return any(
        isinstance(dep.target.module, nn.Conv2d) and 1 < dep.target.module.groups < dep.target.module.out_channels
        for dep, _ in group
    )


def rebuildable(group) -> bool:
    """Whether a pruned run could be loaded again after this group's cut: every layer it touches is
    one shrink_to_state resizes, or one of Torch-Pruning's stand-ins for functional operations. A
    Transformer's model width runs through LayerNorm, attention and a raw position parameter: cut,
    the run saved fine and failed to load ("norm1.bias: [16] in the file, [32] in the model")."""
    return all(
        isinstance(dep.target.module, REBUILDABLE_LAYERS) or type(dep.target.module).__module__.startswith("torch_pruning")
        for dep, _ in group
    )


def part_inputs(model: nn.Module, example: torch.Tensor) -> dict[str, tuple]:
    """Each submodule's positional inputs in one forward pass on `example` (tensors of example's
    device: meta tensors for a skeleton), by name; submodules that took anything but tensors are left out."""
    seen: dict[str, tuple] = {}

    def keep(name):
        def hook(module, args, output):
            if name not in seen and args and all(isinstance(a, torch.Tensor) for a in args):
                seen[name] = tuple(torch.zeros_like(a) for a in args)
        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in model.named_modules()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def traceable_parts(model: nn.Module, inputs: dict[str, tuple]) -> list[str]:
    """The largest submodules whose dependency graph Torch-Pruning can build, where it cannot build
    the whole model's: shufflenet_v2's channel shuffle between blocks breaks the model's graph,
    not each block's own."""
    parts: list[str] = []

    def visit(name: str, module: nn.Module) -> None:
        if not any(isinstance(m, nn.Conv2d) for m in module.modules()) or isinstance(module, (nn.Conv2d, nn.Linear)):
            return  # nothing to prune inside, or a single layer whose width is its part's interface
        if name in inputs:
            try:
                dependency_graph(module, inputs[name])
                parts.append(name)
                return
            except Exception:  # noqa: BLE001 - any failure to build sends the search one level down
                pass
        for child, sub in module.named_children():
            visit(f"{name}.{child}" if name else child, sub)

    for child, sub in model.named_children():
        visit(child, sub)
    return parts


def keeps_part_shapes(model: nn.Module, inputs: dict[str, tuple], cut: ChannelCut) -> bool:
    """Whether this group's cut leaves its part taking and giving the same shapes: only then can the
    part change without the model's graph (which Torch-Pruning cannot build) following it. Checked
    on a trial copy of the part."""
    part = model.get_submodule(cut.scope)
    skeleton = trial_copy(part)
    args = tuple(a.to(trial_device(part)) for a in inputs[cut.scope])
    try:
        with torch.no_grad():
            before = skeleton(*args)
        graph = dependency_graph(skeleton, args)
        root = skeleton.get_submodule(cut.layer[len(cut.scope) + 1:])
        graph.get_pruning_group(root, cut.pruning_fn, [0]).prune()
        with torch.no_grad():
            after = skeleton(*args)
        return _shapes(after) == _shapes(before)
    except Exception:  # noqa: BLE001 - a group that breaks its part is one that stays dense
        return False


def _shapes(output) -> list:
    if isinstance(output, torch.Tensor):
        return [tuple(output.shape)]
    if isinstance(output, (tuple, list)):
        return [shape for item in output for shape in _shapes(item)]
    return [type(output).__name__]


def apply_cuts(model: nn.Module, example: torch.Tensor, cuts: list[ChannelCut]) -> nn.Module:
    """Remove the planned channels from model (in place) and check that it still runs."""
    modules = dict(model.named_modules())
    inputs = part_inputs(model, example) if any(cut.scope for cut in cuts) else {}
    graphs: dict[str, object] = {}
    try:
        for cut in cuts:
            if cut.scope not in graphs:
                # A part's graph is built on the part alone, from its own inputs in the model.
                module, args = (model, (example,)) if not cut.scope else (modules[cut.scope], inputs[cut.scope])
                graphs[cut.scope] = dependency_graph(module, args)
            graphs[cut.scope].get_pruning_group(modules[cut.layer], cut.pruning_fn, list(cut.indices)).prune()
        with torch.no_grad():
            model(example)  # the pruned graph must still run
    except TORCH_PRUNING_ERRORS as exc:
        raise BmcError(f"structured pruning failed on this architecture: {type(exc).__name__}: {exc}") from None
    return model


def pruned_copy(model: nn.Module, example: torch.Tensor, cuts: list[ChannelCut]) -> nn.Module:
    """A copy of model with the planned channels removed; the model is untouched."""
    return apply_cuts(copy.deepcopy(model), example, cuts)
