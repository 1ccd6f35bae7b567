"""Diffusion schedulers in pure numpy, numerically matching diffusers and configured from the
same fields as diffusers' ``scheduler_config.json``.

>>> sched = make_scheduler(json.load(open("scheduler_config.json")))            # class from _class_name
>>> sched = make_scheduler(config, name="dpmpp-2m")                             # override the class
"""

from __future__ import annotations

from typing import Any, Mapping

from .base import BaseScheduler, SchedulerConfigError
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpmpp_2m import DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .pndm import PNDMScheduler
from .respaced_ddim import RespacedDDIMScheduler

SCHEDULERS: dict[str, type[BaseScheduler]] = {
    "ddim": DDIMScheduler,
    "dpmpp-2m": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "ddpm": DDPMScheduler,
    "pndm": PNDMScheduler,
    "ddim-respaced": RespacedDDIMScheduler,  # the original DiT's DDIM (respaced timesteps, no clipping)
}
#: diffusers class name -> our scheduler name, and back.
CLASS_TO_NAME: dict[str, str] = {cls.class_name: name for name, cls in SCHEDULERS.items()}
NAME_TO_CLASS: dict[str, str] = {name: cls.class_name for name, cls in SCHEDULERS.items()}


def scheduler_name_for_class(class_name: str) -> str:
    """``"DDIMScheduler"`` -> ``"ddim"``; unknown diffusers class -> SchedulerConfigError."""
    try:
        return CLASS_TO_NAME[class_name]
    except (KeyError, TypeError):
        raise SchedulerConfigError(
            f"unsupported scheduler class {class_name!r} (supported: {sorted(CLASS_TO_NAME)})",
            field="_class_name", value=class_name) from None


def class_name_for_scheduler(name: str) -> str:
    """``"ddim"`` -> ``"DDIMScheduler"``; unknown name -> SchedulerConfigError."""
    try:
        return NAME_TO_CLASS[name]
    except (KeyError, TypeError):
        raise SchedulerConfigError(f"unknown scheduler name {name!r} (supported: {sorted(SCHEDULERS)})",
                                   field="name", value=name) from None


def make_scheduler(config: Mapping[str, Any], name: str | None = None) -> BaseScheduler:
    """Scheduler from a diffusers ``scheduler_config.json`` dict.

    With ``name=None`` the class comes from ``_class_name``. With ``name`` given, that scheduler is
    built from the config the way diffusers' ``OtherScheduler.from_config(config)`` does: fields the
    class does not have are ignored, shared fields are kept. Unsupported values raise
    SchedulerConfigError naming the field and the value."""
    if name is None:
        if "_class_name" not in config:
            raise SchedulerConfigError("scheduler config has no '_class_name'; pass name=", field="_class_name")
        name = scheduler_name_for_class(config["_class_name"])
    class_name_for_scheduler(name)  # validates
    return SCHEDULERS[name].from_config(config)


__all__ = [
    "SCHEDULERS", "CLASS_TO_NAME", "NAME_TO_CLASS", "BaseScheduler", "SchedulerConfigError", "DDIMScheduler",
    "DDPMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "PNDMScheduler", "RespacedDDIMScheduler",
    "make_scheduler",
    "scheduler_name_for_class", "class_name_for_scheduler",
]
