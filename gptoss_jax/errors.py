"""The one base class of every user-facing gptoss-jax error.

Every error raised for a user's input — a bad path, a malformed or corrupted file, an invalid argument — derives
from :class:`GptOssError` *and* keeps its historical builtin base (``class ConfigError(GptOssError, ValueError)``),
so both ``except gptoss_jax.GptOssError`` and an existing ``except ValueError`` catch it. The command-line tools
print any :data:`USER_ERRORS` as one line (``prog: error: <message naming the file / tensor / argument>``) and
never a traceback.

The classes deriving from it: ``ConfigError`` (config.json / presets), ``CheckpointError`` (safetensors files and
converted checkpoints, integrity included), ``ConvertError`` (gptoss-convert), ``LoadError`` (gptoss_jax.load),
``GenerationError`` (generation / scoring arguments), ``TokenizerError`` and ``TokenizerMissingError``,
``ShardingError``, ``HarmonyParseError``.

Exception: the kernels package :mod:`gptoss_jax.kernels` is standalone (it must not import gptoss_jax), so its
``gptoss_jax.kernels.Int4LayoutError`` derives from ``ValueError`` only; :data:`USER_ERRORS` lists it next to
``GptOssError`` and ``OSError`` for the one-line handlers.
"""

from __future__ import annotations


class GptOssError(Exception):
    """Base class of gptoss-jax's user-facing errors (see the module docstring for the list and the one exception,
    ``gptoss_jax.kernels.Int4LayoutError``). The message names the file, tensor or argument at fault."""


def user_errors() -> tuple[type[BaseException], ...]:
    """What the CLIs report as a one-line error: GptOssError, the kernels' Int4LayoutError and OSError (a path that
    cannot be read or written: permissions, read-only or full file system, a parent that is a file)."""
    from gptoss_jax.kernels.int4_layout import Int4LayoutError
    return (GptOssError, Int4LayoutError, OSError)


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: ``<path>: <reason>`` (``<path> -> <path2>`` for renames)."""
    reason = e.strerror or str(e) or type(e).__name__
    if e.filename is None:
        return f"{type(e).__name__}: {reason}"
    names = str(e.filename) + (f" -> {e.filename2}" if e.filename2 is not None else "")
    return f"{names}: {reason}"


__all__ = ["GptOssError", "user_errors", "describe_os_error"]
