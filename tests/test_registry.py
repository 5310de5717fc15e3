"""`Registry[T]`: the one registry type behind every name a user picks."""

from __future__ import annotations

import pytest

from safeunits.errors import UserValueError
from safeunits.registry import Registry


class NoSuchThing(UserValueError):
    pass


def test_registry_adds_gets_lists_and_refuses():
    reg: Registry[int] = Registry("thing", error=NoSuchThing, hint="or add one")
    reg.add("b", 2)
    assert reg.register("a")(1) == 1  # the decorator hands the item back
    assert reg.names() == ["b", "a"] and list(reg) == ["b", "a"] and len(reg) == 2 and "a" in reg
    assert reg.get("a") == 1 and reg.items() == {"b": 2, "a": 1}
    with pytest.raises(ValueError, match="a thing named 'a' is already registered"):
        reg.add("a", 3)
    assert reg.add("a", 3, replace=True) == 3 and reg.get("a") == 3
    with pytest.raises(NoSuchThing, match=r"unknown thing 'c'; choose one of: b, a \(or add one\)"):
        reg.get("c")
    twin = reg.copy()
    twin.add("c", 4)
    assert "c" not in reg and twin.get("c") == 4


def test_every_named_choice_is_a_registry():
    from safeunits.data import registry as datasets
    from safeunits.eval import judges
    from safeunits.experiments import steps
    from safeunits.models import adapters, loading
    from safeunits.patching import methods
    from safeunits.train import objectives

    found = [datasets._REGISTRY, judges.JUDGES, steps.STEP_FUNCTIONS, adapters._FAMILIES, loading._NAMED,
             methods._PATCH_METHODS, objectives._OBJECTIVES]
    assert all(isinstance(r, Registry) for r in found)
    assert {"learned", "harm", "keyword", "xstest"} <= set(judges.JUDGES)
    assert {"descent", "ascent", "npo"} <= set(objectives._OBJECTIVES)
