"""The official ``openai-harmony`` library, offline: the reference that :mod:`gptoss_jax.harmony` is checked against.

``openai-harmony`` renders and parses the harmony format with the ``o200k_harmony`` encoding, whose base vocabulary
``o200k_base.tiktoken`` it downloads on first use — unless ``TIKTOKEN_ENCODINGS_BASE`` names a folder holding that
file. No network here (nor in CI), so :func:`o200k_vocab_dir` provides the folder: either the one the caller's
``TIKTOKEN_ENCODINGS_BASE`` already names, or a cache folder into which it unpacks the copy shipped (gzipped) by the
MIT-licensed ``bpe-openai`` package, checking the official SHA-256 before the file is used.

    from gptoss_jax.harmony_reference import load_encoding
    enc = load_encoding()                       # openai_harmony.HarmonyEncoding for gpt-oss, loaded offline
    enc.render_conversation_for_completion(conversation, openai_harmony.Role.ASSISTANT)

Both packages are optional (the ``test`` extra installs them); :class:`HarmonyReferenceError` says what is missing.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
from pathlib import Path

O200K_FILE = "o200k_base.tiktoken"
# SHA-256 of the official o200k_base.tiktoken (the value tiktoken and openai-harmony pin)
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
ENV = "TIKTOKEN_ENCODINGS_BASE"


class HarmonyReferenceError(RuntimeError):
    """openai-harmony or its vocabulary is not available (the message says which and how to provide it)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``$GPTOSS_JAX_CACHE`` or ``$XDG_CACHE_HOME/gptoss-jax`` (default ``~/.cache/gptoss-jax``), ``/tiktoken``."""
    base = os.environ.get("GPTOSS_JAX_CACHE")
    if not base:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptoss-jax"
    return Path(base) / "tiktoken"


def o200k_vocab_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A folder holding a verified ``o200k_base.tiktoken``.

    ``$TIKTOKEN_ENCODINGS_BASE`` wins when it holds the file (it must match the official SHA-256). Otherwise the
    file is unpacked from the ``bpe-openai`` package into `cache_dir` (default :func:`default_cache_dir`) once:
    written to a temporary file, hashed, and renamed into place only if the hash is the official one; a cached
    file with another hash is replaced. Raises :class:`HarmonyReferenceError` if there is no source or a hash
    differs.
    """
    env = os.environ.get(ENV)
    if env and (Path(env) / O200K_FILE).is_file():
        got = _sha256(Path(env) / O200K_FILE)
        if got != O200K_SHA256:
            raise HarmonyReferenceError(f"{Path(env) / O200K_FILE} (from ${ENV}): SHA-256 {got}, expected the "
                                        f"official {O200K_SHA256}")
        return Path(env)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / O200K_FILE
    if target.is_file() and _sha256(target) == O200K_SHA256:
        return cache
    try:
        import importlib.resources
        source = importlib.resources.files("bpe_openai").joinpath(f"data/{O200K_FILE}.gz")
    except ModuleNotFoundError:
        raise HarmonyReferenceError(f"no {O200K_FILE}: install bpe-openai (pip install bpe-openai) or set ${ENV} to "
                                    f"a folder holding it") from None
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{O200K_FILE}.", dir=cache)
    try:
        h = hashlib.sha256()
        with source.open("rb") as raw, gzip.open(raw) as unpacked, os.fdopen(fd, "wb") as out:
            for block in iter(lambda: unpacked.read(1 << 20), b""):
                h.update(block)
                out.write(block)
        if h.hexdigest() != O200K_SHA256:
            raise HarmonyReferenceError(f"bpe-openai's {O200K_FILE}.gz unpacks to SHA-256 {h.hexdigest()}, not the "
                                        f"official {O200K_SHA256}")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return cache


def load_encoding(cache_dir: str | os.PathLike | None = None):
    """``openai_harmony``'s gpt-oss encoding (``HARMONY_GPT_OSS``), loaded without network access."""
    try:
        import openai_harmony
    except ModuleNotFoundError:
        raise HarmonyReferenceError("openai-harmony is not installed (pip install openai-harmony)") from None
    folder = o200k_vocab_dir(cache_dir)
    # openai-harmony reads the variable when it loads the vocabulary; point it at the verified folder
    os.environ[ENV] = str(folder)
    try:
        return openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as e:  # openai-harmony raises its own HarmonyError / RuntimeError
        raise HarmonyReferenceError(f"openai-harmony could not load its vocabulary from {folder}: {e}") from None
