"""Runtimes by name: which exist, which really work here, and one way to open a model on any of them.

`open_session(model, Target(runtime="openvino"))` returns a Session whatever the runtime: its inputs
and outputs, `run(feeds)`, and the device, providers and precision it really got. A runtime
registers with `@register_runtime`; its package is imported only when it is asked for, so a
runtime that is not installed is simply absent (`available_runtimes()`), and asking for it by name
is one line saying how to get it.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import import_module, metadata
from pathlib import Path
from typing import Callable, ClassVar, Protocol

import numpy as np

from bmc.errors import BmcError, UsageError
from bmc.runtime.model_file import ModelBytes, TensorInfo
from bmc.runtime.target import PRECISIONS, Target

# Modules that register the built-in runtimes, in the order they are listed and tried.
BUILTIN_MODULES = ("bmc.runtime.sessions", "bmc.runtime.openvino_sessions")
_RUNTIMES: dict[str, "Runtime"] = {}


class UnknownRuntimeError(UsageError):
    """A runtime name bmc does not know."""


class RuntimeNotInstalledError(BmcError):
    """A runtime bmc knows, but whose package is not installed (or does not work) here."""


class Session(Protocol):
    """A model opened on a runtime: what every runtime's session offers bench, compress and serve."""

    runtime: str
    path: Path
    device: str  # where it really runs: "cpu" or "cuda"
    providers: tuple[str, ...]  # what the runtime really got: onnxruntime providers, OpenVINO execution devices
    threads: int | None  # as asked; None: the runtime's default
    precision: str  # the float precision it really computes in (PRECISIONS)
    session: object  # the runtime's own handle (onnxruntime.InferenceSession, openvino.CompiledModel)

    @property
    def inputs(self) -> tuple[TensorInfo, ...]: ...

    @property
    def outputs(self) -> tuple[TensorInfo, ...]: ...

    @property
    def target(self) -> Target: ...

    @property
    def details(self) -> dict: ...

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]: ...

    def runner(self, feeds: dict[str, np.ndarray]) -> Callable[[], object]: ...

    def error_message(self, exc: BaseException) -> str: ...


class Runtime:
    """A runtime bmc can open models on. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    package: ClassVar[str]  # the pip distribution whose version is reported
    module: ClassVar[str]  # the Python module that must import
    install_hint: ClassVar[str]
    devices: ClassVar[tuple[str, ...]]  # what a Target may name; "auto" picks the best one here
    precisions: ClassVar[tuple[str, ...]]  # what a Target may name on some machine
    options: ClassVar[tuple[str, ...]] = ()  # keyword options open() takes beyond the Target

    def installed(self) -> bool:
        """Whether its module is there at all (it may still fail to import or run: see problem())."""
        try:
            import_module(self.module)
        except ModuleNotFoundError as exc:
            # Only the module itself missing means "not installed"; a dependency of it missing is a broken install.
            return exc.name not in (None, self.module) and not str(exc.name).startswith(self.module + ".")
        except Exception:  # present, but broken: problem() says how
            return True
        return True

    def version(self) -> str | None:
        """The installed version, None when it is not installed."""
        if not self.installed():
            return None
        try:
            return metadata.version(self.package)
        except metadata.PackageNotFoundError:
            return getattr(import_module(self.module), "__version__", None)

    def problem(self) -> str | None:
        """None when the runtime imports and runs a tiny model here; else why not, in a few words."""
        raise NotImplementedError

    def precisions_here(self, device: str) -> tuple[str, ...]:
        """The precisions this machine can run on `device`."""
        return ("fp32",)

    def describe(self) -> dict:
        """What `bmc info` shows: version, devices and precisions here, runtime-specific facts."""
        raise NotImplementedError

    def open(self, model: Path | ModelBytes, target: Target, **options) -> Session:
        raise NotImplementedError


def register_runtime(cls: type[Runtime]) -> type[Runtime]:
    """Class decorator: make the runtime known by its name."""
    _RUNTIMES[cls.name] = cls()
    return cls


def list_runtimes() -> tuple[str, ...]:
    """Every runtime bmc knows, installed here or not, in the order they are tried."""
    _load_builtin()
    return tuple(_RUNTIMES)


def get_runtime(name: str) -> Runtime:
    """The runtime called `name`, installed or not; UnknownRuntimeError naming the known ones."""
    _load_builtin()
    if name not in _RUNTIMES:
        raise UnknownRuntimeError(f"unknown runtime {name!r}; known: {', '.join(_RUNTIMES)}")
    return _RUNTIMES[name]


def available_runtimes(device: str | None = None) -> tuple[str, ...]:
    """The runtimes that really import and run a model here (and have `device`, when given)."""
    return tuple(
        name for name in list_runtimes() if runtime_problem(name) is None and (device is None or device in _RUNTIMES[name].devices)
    )


@lru_cache(maxsize=None)
def runtime_problem(name: str) -> str | None:
    """Why runtime `name` cannot run here (None when it can); asked once per process."""
    return get_runtime(name).problem()


def require_runtime(name: str) -> Runtime:
    """The runtime, installed and working here; else one line saying what to do."""
    runtime = get_runtime(name)
    problem = runtime_problem(name)
    if problem is not None:
        if runtime.version() is None:
            raise RuntimeNotInstalledError(f"runtime {name!r} is not installed here ({runtime.install_hint})")
        raise RuntimeNotInstalledError(f"runtime {name!r} is installed but does not work here ({problem})")
    return runtime


def open_session(model: Path | str | ModelBytes, target: Target | None = None, **options) -> Session:
    """A session for the model (a file, or bytes already read) on the target's runtime and device
    (default: onnxruntime on the CPU).

    options are runtime-specific (onnxruntime: cuda_graph, tensorrt, conv_algo_search,
    profile_prefix; openvino: performance_hint, streams); one a runtime does not take is a UsageError.
    """
    target = target if target is not None else Target()
    runtime = require_runtime(target.runtime)
    unknown = sorted(set(options) - set(runtime.options))
    if unknown:
        raise UsageError(
            f"runtime {runtime.name!r} takes no option {unknown[0]!r}; its options: {', '.join(runtime.options) or 'none'}"
        )
    return runtime.open(model if isinstance(model, ModelBytes) else Path(model), target, **options)


def plan_targets(
    runtimes: tuple[str, ...] | None = None,
    precisions: tuple[str, ...] | None = ("fp32",),
    device: str = "cpu",
    threads: int | None = None,
) -> tuple[Target, ...]:
    """The targets to run: each runtime with each precision it has here, in runtime order.

    runtimes None: every runtime available here that has `device`; named ones must be installed
    and have it. precisions None: each runtime's precisions here; named ones are run by the
    runtimes that have them here, and a precision none of them has is an error.
    """
    if runtimes is None:
        names = available_runtimes(device)
    else:
        names = tuple(dict.fromkeys(runtimes))
        for name in names:
            runtime = require_runtime(name)
            if device not in runtime.devices:
                raise UsageError(f"runtime {name!r} has no device {device!r}; its devices: {', '.join(runtime.devices)}")
    if precisions is not None:
        for precision in precisions:
            if precision not in PRECISIONS:
                raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    here = {name: get_runtime(name).precisions_here(device) for name in names}
    targets = []
    for name in names:
        wanted = here[name] if precisions is None else tuple(p for p in dict.fromkeys(precisions) if p in here[name])
        targets += [Target(name, device, precision, threads) for precision in wanted]
    for precision in precisions or ():
        if not any(t.precision == precision for t in targets):
            shown = "; ".join(f"{name} {', '.join(here[name])}" for name in names)
            raise UsageError(f"no runtime asked runs precision {precision!r} on {device} here; precisions here: {shown}")
    return tuple(targets)


def describe_runtimes() -> list[dict]:
    """Every known runtime: available or not, and for those here their version, devices and precisions."""
    described = []
    for name in list_runtimes():
        runtime = _RUNTIMES[name]
        problem = runtime_problem(name)
        if problem is None:
            described.append({"name": name, "available": True, **runtime.describe()})
        else:
            installed = runtime.version() is not None
            note = f"does not work here ({problem})" if installed else f"not installed ({runtime.install_hint})"
            described.append({"name": name, "available": False, "version": runtime.version(), "note": note})
    return described


def _load_builtin() -> None:
    # The runtime modules import the registry to register themselves: imported on first use, not at
    # the registry's own import, and none of them imports its runtime's package until asked to.
    if len(_RUNTIMES) < len(BUILTIN_MODULES):
        for module in BUILTIN_MODULES:
            import_module(module)


__all__ = [
    "Runtime",
    "RuntimeNotInstalledError",
    "Session",
    "UnknownRuntimeError",
    "available_runtimes",
    "describe_runtimes",
    "get_runtime",
    "list_runtimes",
    "open_session",
    "plan_targets",
    "register_runtime",
    "require_runtime",
]
