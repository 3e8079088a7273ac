"""``convert_to_fp8``: swap a model's eligible ``nn.Linear`` layers for ``Fp8Linear``, in place, and say what it did."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from dualflow.fp8.nn import Fp8Linear
from dualflow.fp8.recipe import Fp8Recipe


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """Qualified names of the converted layers, and of the skipped ones with the reason."""

    converted: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} linear layer(s) to FP8, skipped {len(self.skipped)}"]
        lines += [f"  fp8  {name}" for name in self.converted]
        lines += [f"  skip {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _skip_reason(name: str, module: nn.Module, recipe: Fp8Recipe,
                 filter_fn: Callable[[str, nn.Module], bool] | None) -> str | None:
    if isinstance(module, Fp8Linear):
        return "already an Fp8Linear"
    if type(module) is not nn.Linear:
        return (f"{type(module).__name__} subclasses nn.Linear; its owner may use the weight directly "
                "(convert it with Fp8Linear.from_linear if its forward is nn.Linear's)")
    if not name:
        return "the root module cannot be replaced in place; use Fp8Linear.from_linear(model)"
    pattern = recipe.high_precision_match(name)
    if pattern is not None:
        return f"kept in high precision by the recipe (pattern {pattern!r})"
    if filter_fn is not None and not filter_fn(name, module):
        return "excluded by filter_fn"
    bad = [f"{attr}={getattr(module, attr)}" for attr in ("in_features", "out_features") if getattr(module, attr) % 16]
    if bad:
        return f"{' and '.join(bad)} not a multiple of 16 (FP8 GEMM operand alignment)"
    return None


def convert_to_fp8(model: nn.Module, recipe: Fp8Recipe | None = None,
                   filter_fn: Callable[[str, nn.Module], bool] | None = None) -> ConversionReport:
    """Replace every eligible ``nn.Linear`` of ``model`` by an ``Fp8Linear`` sharing its parameters.

    Eligible: exactly ``nn.Linear`` (not a subclass), not matched by ``recipe.high_precision``, accepted by
    ``filter_fn(qualified_name, module)`` when given, both dimensions multiples of 16.
    """
    recipe = recipe or Fp8Recipe()
    converted, skipped = [], []
    replacement: dict[int, Fp8Linear] = {}  # a layer shared by two parents becomes one shared Fp8Linear
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(module, nn.Linear):
            continue
        why = _skip_reason(name, module, recipe, filter_fn) if id(module) not in replacement else None
        if why is not None:
            skipped.append((name, why))
            continue
        new = replacement.setdefault(id(module), Fp8Linear.from_linear(module, recipe))
        new.fp8_name = new.fp8_name or name  # errors name the layer (a shared one by its first name)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        converted.append(name)
    return ConversionReport(tuple(converted), tuple(skipped))
