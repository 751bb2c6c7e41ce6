"""Training objectives behind one interface (:class:`~.base.Objective`) and their registry.

``m2-pretrain --objective NAME`` picks one; ``itc`` (GBA-ITC, :mod:`.itc`) is the default.
A new objective is a subclass of :class:`Objective` registered here (or, from user code, with
:func:`register_objective` before the arguments are parsed); the trainer needs no change.
"""

from __future__ import annotations

from typing import Dict, Type

from .base import Objective, ObjectiveContext

__all__ = ["Objective", "ObjectiveContext", "OBJECTIVES", "register_objective",
           "build_objective", "objective_names"]

OBJECTIVES: Dict[str, str] = {
    "itc": "megatron_m2.objectives.itc:ITCObjective",
    "m2": "megatron_m2.objectives.m2:M2Objective",
}
"""Registered objectives: name → ``module:Class`` (imported on use: argument parsing stays
torch-free) or the class itself."""


def register_objective(cls: Type[Objective]) -> Type[Objective]:
    """Register ``cls`` under ``cls.name`` (usable as a class decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    OBJECTIVES[cls.name] = cls
    return cls


def objective_names():
    """Names accepted by ``--objective``."""
    return sorted(OBJECTIVES)


def objective_class(name: str) -> Type[Objective]:
    """The class registered as ``name``."""
    import importlib

    entry = OBJECTIVES[name]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
    return entry


def build_objective(name: str, ctx: ObjectiveContext) -> Objective:
    """The objective ``name`` for this rank."""
    return objective_class(name)(ctx)
