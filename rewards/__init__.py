"""Reward recipes: the built-ins by name, anything else by dotted path.

A recipe is a function `(RewardInputs, RewardRules) -> RewardOutput` (the `RewardRecipe` Protocol in
`rewards.base`). `BUILTIN_RECIPES` is a plain dict written out below, not a registry filled by imports; a
custom recipe needs no registration, only a dotted path such as `my_pkg.my_rewards.strict_hybrid`.
"""

from __future__ import annotations

import importlib

from rewards.base import RewardRecipe, RewardRules, apply_recipe
from rewards.guard_only import guard_only
from rewards.helpfulness_only import helpfulness_only
from rewards.hybrid import hybrid

__all__ = ["BUILTIN_RECIPES", "RewardRecipe", "RewardRules", "apply_recipe", "load_recipe"]

BUILTIN_RECIPES: dict[str, RewardRecipe] = {
    "hybrid": hybrid,
    "guard_only": guard_only,
    "helpfulness_only": helpfulness_only,
}


def load_recipe(name_or_path: str) -> RewardRecipe:
    """Return a built-in recipe by name, or import `package.module.function`.

    Raises:
        ValueError: naming the string and listing the built-ins, when it is neither a built-in nor an
            importable callable. An ImportError raised *inside* an existing module (a missing dependency)
            propagates as is.
    """
    if name_or_path in BUILTIN_RECIPES:
        return BUILTIN_RECIPES[name_or_path]
    builtins = ", ".join(sorted(BUILTIN_RECIPES))
    problem = f"unknown reward recipe {name_or_path!r}: not a built-in ({builtins}) nor a dotted path"
    module_path, _, attr = name_or_path.rpartition(".")
    if not module_path:
        raise ValueError(f"{problem} of the form package.module.function")
    try:
        module = importlib.import_module(module_path)
    except ModuleNotFoundError as err:
        # Only translate "that module does not exist"; a module that exists but fails to import is a real bug.
        if err.name is None or not (module_path == err.name or module_path.startswith(err.name + ".")):
            raise
        raise ValueError(f"{problem}; module {module_path!r} was not found") from err
    recipe = getattr(module, attr, None)
    if not callable(recipe):
        raise ValueError(f"{problem}; {module_path!r} has no callable {attr!r}")
    return recipe
