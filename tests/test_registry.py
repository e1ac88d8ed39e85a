"""The generic name -> builder map behind the method and backbone registries."""

from __future__ import annotations

import pytest

from dscl.registry import Registry


def make(same_again: bool = True) -> Registry:
    return Registry(
        duplicate=lambda name: ValueError(f"{name} twice"),
        unknown=lambda name, names: KeyError(f"{name} is not one of {', '.join(names)}"),
        same_again=same_again,
    )


def first() -> str:
    return "first"


def second() -> str:
    return "second"


def test_names_keep_registration_order_and_get_returns_the_builder() -> None:
    registry = make()
    assert registry.add("b", first) is first
    registry.add("a", second)
    assert registry.names() == ["b", "a"] and len(registry) == 2
    assert registry.get("a") is second and "b" in registry and "c" not in registry


def test_a_second_builder_is_refused_the_same_one_only_with_same_again() -> None:
    registry = make()
    registry.add("a", first)
    registry.add("a", first)  # the same builder again: a no-op
    with pytest.raises(ValueError, match="a twice"):
        registry.add("a", second)
    with pytest.raises(ValueError, match="a twice"):
        registry.check_add("a", second)
    assert registry.get("a") is first
    strict = make(same_again=False)
    strict.add("a", first)
    with pytest.raises(ValueError, match="a twice"):
        strict.add("a", first)


def test_unknown_name_raises_the_callers_error_listing_names() -> None:
    registry = make()
    registry.add("x", first)
    registry.add("y", second)
    with pytest.raises(KeyError, match="z is not one of x, y"):
        registry.get("z")


def test_remove_forgets_a_name_and_ignores_an_unknown_one() -> None:
    registry = make()
    registry.add("a", first)
    registry.add("b", second)
    registry.remove("a")
    registry.remove("never")
    assert registry.names() == ["b"] and "a" not in registry
    registry.add("a", second)  # a removed name can be registered anew
    assert registry.names() == ["b", "a"]
