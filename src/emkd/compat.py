"""Differences between the `transformers` releases emkd supports, each handled in one named place.

emkd is tested on the versions in ``requirements/lock.txt`` (the newest releases on the day the lock was written),
on the lower bounds of ``pyproject.toml`` (``requirements/oldest.txt``, ``make test-oldest``) and on whatever pip
installs today (``make test-latest``). When a release renames or moves something we use, the difference is resolved
here, by looking at the installed library's public API rather than at its version string, and the rest of the code
imports the answer.

- **The decoder cache's name** (transformers 5.24). Up to 5.23 a causal LM's ``forward``, ``generate``'s model inputs
  (``GenerationMixin.prepare_inputs_for_generation``) and every ``ModelOutput`` call the key/value cache
  ``past_key_values``. From 5.24 they call it ``cache``; ``past_key_values`` is a deprecated alias for callers, but a
  ``ModelOutput`` subclass can no longer declare a field of that name (its ``__init__`` renames the keyword to
  ``cache``). :data:`CACHE_KEY` is the name the installed release uses; :func:`pop_cache` reads a cache passed under
  either name.
"""

from __future__ import annotations

import inspect
import platform
from importlib import metadata
from typing import Any

from transformers import GenerationMixin

# ``inspect.signature`` follows ``functools.wraps`` through transformers' ``deprecate_kwarg`` decorator.
_GENERATION_PARAMETERS = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters

CACHE_KEY: str = "cache" if "cache" in _GENERATION_PARAMETERS else "past_key_values"
"""The keyword and ``ModelOutput`` field that hold a decoder's cache: ``"cache"`` from transformers 5.24 on,
``"past_key_values"`` before."""

_CACHE_ALIASES = ("cache", "past_key_values")


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove and return the cache passed in ``kwargs`` under either name (``None`` if absent).

    ``generate`` passes it under :data:`CACHE_KEY`; a caller written for the other release may use the other name.
    Raises ``ValueError`` if both names hold a cache.
    """
    found = {name: kwargs.pop(name) for name in _CACHE_ALIASES if kwargs.get(name) is not None}
    for name in _CACHE_ALIASES:
        kwargs.pop(name, None)
    if len(found) > 1:
        raise ValueError("pass the decoder cache once, as `cache` or as `past_key_values`, not both")
    return next(iter(found.values()), None)


# The libraries whose releases change emkd's behaviour, reported by `emkd --version` and stored with every run.
REPORTED_PACKAGES = ("emkd", "torch", "transformers", "accelerate", "tokenizers", "safetensors", "huggingface-hub",
                     "numpy", "scipy")


def installed_versions() -> dict[str, str]:
    """Python's and each of :data:`REPORTED_PACKAGES`' installed version (``"absent"`` if not installed)."""
    versions = {"python": platform.python_version()}
    for name in REPORTED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


__all__ = ["CACHE_KEY", "REPORTED_PACKAGES", "installed_versions", "pop_cache"]
