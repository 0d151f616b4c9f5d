"""Trainers and command modules, found by name without the base package importing them.

Trainers register through the ``tokscale.trainers`` entry-point group (pyproject.toml, one line each):

    [project.entry-points."tokscale.trainers"]
    tokenizer = "tokscale.tokenizers.task:TokenizerTask"

and, for trainers that live outside an installed package (a research script, the tests), through the
environment: ``TOKSCALE_TRAINERS="toy=/path/to/toy_task.py:ToyTask,other=my_mod:OtherTask"``.

Command-line areas register through ``tokscale.commands`` (modules with ``add_commands(sub)`` and/or
``add_bench_commands(bench_sub)``). The base package reads these names from the installed metadata only, so the
import arrows point one way: trainers and launchers import the base, never the reverse.

What the launchers run is a *runnable*: ``load_config(path, overrides)`` and ``main(cfg, should_stop)``. A
registered trainer becomes one through :class:`TrainerRunnable` (main = the shared loop); a module or object
with those two functions (an evaluation job) is one already.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

TRAINER_GROUP = "tokscale.trainers"
COMMAND_GROUP = "tokscale.commands"
TRAINERS_ENV = "TOKSCALE_TRAINERS"


def _entry_points(group: str) -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=group)}


def trainer_specs() -> dict[str, str]:
    """Registered trainer names -> ``module:attr`` or ``file.py:attr`` (the environment adds and overrides)."""
    specs = _entry_points(TRAINER_GROUP)
    for item in os.environ.get(TRAINERS_ENV, "").replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, spec = item.partition("=")
        if not sep or not name.strip() or not spec.strip():
            raise ValueError(
                f"{TRAINERS_ENV} item {item!r}: expected NAME=module:Class or NAME=/path/file.py:Class"
            )
        specs[name.strip()] = spec.strip()
    return specs


def command_modules() -> list[str]:
    return [value for _, value in sorted(_entry_points(COMMAND_GROUP).items())]


def load_module(spec: str) -> ModuleType:
    """A module by import name (``tokscale.tokenizers.task``) or by file path (``/x/toy_task.py``)."""
    if spec.endswith(".py"):
        path = Path(spec).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"trainer file {path} not found")
        name = f"tokscale_plugin_{path.stem}"
        if name in sys.modules:
            return sys.modules[name]
        mod_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        mod_spec.loader.exec_module(module)
        return module
    return importlib.import_module(spec)


def load_object(spec: str) -> Any:
    """``module:attr`` or ``file.py:attr`` -> the object; a bare module or file -> the module."""
    target, _, attr = spec.rpartition(":") if ":" in spec and not spec.endswith(".py") else (spec, "", "")
    module = load_module(target)
    if not attr:
        return module
    if not hasattr(module, attr):
        raise ValueError(f"{target} has no attribute {attr!r} (from {spec!r})")
    return getattr(module, attr)


def trainer(name: str):
    """The Task class registered as ``name``; an unknown name is an error listing the registered ones."""
    specs = trainer_specs()
    if name not in specs:
        raise ValueError(
            f"unknown trainer {name!r}; registered: {sorted(specs)} (entry points of {TRAINER_GROUP!r}, or "
            f"{TRAINERS_ENV}=NAME=module:Class)"
        )
    return _task_class(specs[name], name)


def _task_class(spec: str, name: str | None = None):
    from tokscale.trainer import Task

    task_cls = load_object(spec)
    if not (isinstance(task_cls, type) and issubclass(task_cls, Task)):
        raise ValueError(f"trainer {name or spec!r} ({spec}) is not a tokscale.trainer.Task subclass")
    if name and not task_cls.name:
        task_cls.name = name
    return task_cls


class TrainerRunnable:
    """A registered trainer as a runnable: its config loader and the shared loop. Pickles by name and spec."""

    def __init__(self, spec: str, name: str | None = None) -> None:
        self.spec, self.name = spec, name

    @property
    def task(self):
        return _task_class(self.spec, self.name)

    def load_config(self, path, overrides=()):
        return self.task.load_config(path, overrides)

    def main(self, cfg, should_stop=None) -> dict:
        from tokscale.loop import train

        return train(self.task, cfg, should_stop)


def resolve_runnable(name_or_spec: str):
    """A registered trainer name, ``module:Class`` / ``file.py:Class`` of a Task, or a module / file / object
    offering ``load_config(path, overrides)`` and ``main(cfg, should_stop)``."""
    specs = trainer_specs()
    if name_or_spec in specs:
        trainer(name_or_spec)  # fails early, naming the trainer, when its class does not load
        return TrainerRunnable(specs[name_or_spec], name_or_spec)
    looks_like_spec = ":" in name_or_spec or name_or_spec.endswith(".py") or "." in name_or_spec
    if not looks_like_spec:
        trainer(name_or_spec)  # raises: unknown name, listing the registered ones
    obj = load_object(name_or_spec)
    from tokscale.trainer import Task

    if isinstance(obj, type) and issubclass(obj, Task):
        return TrainerRunnable(name_or_spec)
    for attr in ("load_config", "main"):
        if not callable(getattr(obj, attr, None)):
            raise ValueError(
                f"{name_or_spec!r} is neither a registered trainer, a Task class, nor a runnable with "
                "load_config(path, overrides) and main(cfg, should_stop)"
            )
    return obj


def _absolute(spec: str) -> str:
    """``rel/file.py[:attr]`` -> an absolute path (another process or node starts elsewhere)."""
    target, sep, attr = spec.rpartition(":") if ":" in spec and not spec.endswith(".py") else (spec, "", "")
    if target.endswith(".py"):
        target = str(Path(target).resolve())
    return f"{target}{sep}{attr}"


def runnable_spec(runnable) -> str:
    """What another process (a ``--nproc`` rank, a Slurm task) is given to find the runnable again."""
    if isinstance(runnable, TrainerRunnable):
        return _absolute(runnable.spec)
    if isinstance(runnable, ModuleType):
        path = getattr(runnable, "__file__", "")
        return path if runnable.__name__.startswith("tokscale_plugin_") else runnable.__name__
    raise ValueError(f"cannot name {runnable!r} for a job; pass a trainer name or a module")
