"""The public surface: curated, sorted, and shown under its public module path."""

from __future__ import annotations

import types

import asyncgone
import asyncgone.testing


def test_all_is_sorted_and_complete() -> None:
    """``__all__`` lists every public name exactly once, constants first, then sorted."""
    # Submodules (imported as a side effect, or by pytest loading the plugin) and names
    # pytest's assertion rewriting adds are not part of the API.
    public = sorted(
        name
        for name in dir(asyncgone)
        if name[0].isalpha() and not isinstance(getattr(asyncgone, name), types.ModuleType)
    )
    assert asyncgone.__all__ == sorted(asyncgone.__all__, key=lambda n: (not n.isupper(), n))
    assert sorted(asyncgone.__all__) == public


def test_public_objects_show_the_public_module() -> None:
    """Classes and functions report ``asyncgone`` as their module, not a private one."""
    for name in asyncgone.__all__:
        obj = getattr(asyncgone, name)
        if callable(obj):
            assert obj.__module__ == "asyncgone", name
    for name in asyncgone.testing.__all__:
        assert getattr(asyncgone.testing, name).__module__ == "asyncgone.testing"


def test_package_is_typed() -> None:
    """The package ships ``py.typed`` so type checkers use its annotations."""
    from importlib.resources import files

    assert files("asyncgone").joinpath("py.typed").is_file()
