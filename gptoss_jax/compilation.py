"""JAX's persistent compilation cache, on by default, so a second process starts warm.

Compiling the 120b model's prefill and decode takes seconds per shape; XLA can keep the compiled executables on disk
(``jax_compilation_cache_dir``) and a later process with the same jax version, model structure and shapes loads them
instead of compiling. :func:`enable_compilation_cache` turns that on in a per-user folder unless the user configured
jax's cache themselves:

* ``GPTOSS_JAX_COMPILATION_CACHE=/some/dir`` — use that folder;
* ``GPTOSS_JAX_COMPILATION_CACHE=0`` (or ``off``/``false``/``no``) — leave jax's cache off;
* unset — ``$XDG_CACHE_HOME/gptoss-jax/jax-compilation-cache`` (default ``~/.cache/...``).

Entries that took less than ``jax_persistent_cache_min_compile_time_secs`` (jax's default, 1 s) to compile are not
written, so tiny CPU models do not fill the folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "GPTOSS_JAX_COMPILATION_CACHE"
_OFF = {"0", "off", "false", "no"}
_enabled: str | None = None


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gptoss-jax" / "jax-compilation-cache"


def enable_compilation_cache() -> str | None:
    """Turns on jax's persistent compilation cache (see the module doc). Returns the folder in use, or None when
    off. Never raises for an unusable folder: compiling without the cache is always possible."""
    global _enabled
    current = jax.config.jax_compilation_cache_dir
    if current:  # configured by the user (or already by us): leave it
        return current
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in _OFF:
        return None
    folder = Path(setting).expanduser() if setting else default_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    _enabled = str(folder)
    return _enabled
