"""Safe file-system operations shared by the converter, the checkpoint writer and the CLIs.

* :func:`user_path` — any path form a user types (relative, ``~``, symlink, trailing slash) as an absolute path.
* :func:`check_destination` — the one rule for replacing an output folder: an existing DST is replaced only with
  ``force`` and only if it is a previous gptoss-jax checkpoint (or an empty folder), never a folder that is, holds or
  lies inside a source.
* :func:`make_temp_dir` / :func:`clean_stale_temp_dirs` — ``DST.tmp-<random>`` work folders carry an owner file
  (pid, host); a later run removes those whose process is dead (a SIGKILLed run), and only those: nothing without
  the owner file is ever deleted.
* :func:`deferred_signals` — SIGINT / SIGTERM are held while a background writer (Orbax) is busy, then raised as
  :class:`Interrupted`, so cleanup never races a writer thread.
* :func:`file_digests` / :func:`verify_files` — per-file size and SHA-256 (hashlib; multi-threaded, hashlib releases
  the GIL), recorded by writers and checked by readers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from gptoss_jax.errors import GptOssError
from gptoss_jax.safetensors_io import CheckpointError

OWNER_FILE = ".gptoss-tmp-owner"
HASH_CHUNK = 8 << 20
DIGEST = "sha256"


class DestinationError(CheckpointError):
    """An output path that would overwrite or delete something the command did not create (a CheckpointError, so a
    GptOssError and a ValueError)."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM received; ``signum`` says which (the CLIs exit with 128 + signum)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


# ------------------------------------------------------------------------------------------------------------ paths
def user_path(path: str | os.PathLike) -> Path:
    """`path` with ``~`` expanded, made absolute against the current folder (symlinks kept: they are resolved only
    for comparisons). Trailing slashes are dropped by Path. Orbax/TensorStore refuse relative paths, hence this."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def is_gptoss_checkpoint(path: Path) -> bool:
    from gptoss_jax.checkpoint import METADATA_FILE
    return (path / METADATA_FILE).is_file()


def check_destination(dst: str | os.PathLike, *, force: bool, sources: Iterable[str | os.PathLike] = (),
                      what: str = "output") -> Path:
    """Validates an output folder before anything is written; returns it absolute.

    Refuses (DestinationError, naming the path): DST that is, holds or lies inside a source (whatever `force`);
    an existing DST without `force`; with `force`, an existing DST that is not a folder, or a non-empty folder that
    is not a previous gptoss-jax checkpoint (no gptoss_checkpoint.json) — `force` never deletes anything else.
    """
    dst = user_path(dst)
    real_dst = dst.resolve()
    for src in sources:
        real_src = user_path(src).resolve()
        if _within(real_dst, real_src) and (real_dst == real_src or dst.exists()):
            raise DestinationError(f"{dst}: is the source {src} or lies inside it; choose another {what} folder")
        if _within(real_src, real_dst):
            raise DestinationError(f"{dst}: contains the source {src}; choose another {what} folder")
    if os.path.lexists(dst):
        if not force:
            raise DestinationError(f"{dst}: already exists (pass --force / force=True to replace a previous "
                                   f"gptoss-jax checkpoint)")
        if dst.is_symlink() or not dst.is_dir():
            kind = "a symlink" if dst.is_symlink() else "not a folder"
            raise DestinationError(f"{dst}: exists and is {kind}; --force replaces only a previous gptoss-jax "
                                   f"checkpoint folder")
        if any(dst.iterdir()) and not is_gptoss_checkpoint(dst):
            raise DestinationError(f"{dst}: exists and is not a gptoss-jax checkpoint (no gptoss_checkpoint.json); "
                                   f"--force replaces only a previous checkpoint or an empty folder, remove it "
                                   f"yourself if you mean it")
    return dst


# ----------------------------------------------------------------------------------------------- temporary folders
def _owner_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def mark_owned(folder: Path) -> None:
    """Writes the owner file that makes `folder` removable by clean_stale_temp_dirs once this process is gone."""
    (folder / OWNER_FILE).write_text(json.dumps(_owner_record()))


def clean_stale_temp_dirs(dst: Path) -> list[Path]:
    """Removes ``DST.tmp-*`` / ``DST.old-*`` siblings left by a killed run of this host (owner pid dead). Folders
    without a readable owner file, of another host, or of a live process are left alone. Returns those removed."""
    removed = []
    parent = dst.parent
    if not parent.is_dir():
        return removed
    for cand in parent.glob(f"{dst.name}.*-*"):
        if not (cand.name.startswith(f"{dst.name}.tmp-") or cand.name.startswith(f"{dst.name}.old-")):
            continue
        try:
            owner = json.loads((cand / OWNER_FILE).read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if host != socket.gethostname() or _pid_alive(pid):
            continue
        remove_tree(cand)
        removed.append(cand)
    return removed


def remove_own_temp_dirs(dst: str | os.PathLike) -> list[Path]:
    """Removes the ``DST.tmp-*`` / ``DST.old-*`` folders this process owns (after an interrupt); returns those that
    could not be removed."""
    dst = user_path(dst)
    left = []
    for cand in dst.parent.glob(f"{dst.name}.*-*") if dst.parent.is_dir() else []:
        try:
            owner = json.loads((cand / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(owner, dict) and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            if not remove_tree(cand):
                left.append(cand)
    return left


def make_temp_dir(dst: Path) -> Path:
    """Creates ``DST.tmp-<random>`` (parents too) with an owner file, after cleaning stale ones of dead runs."""
    dst = user_path(dst)
    clean_stale_temp_dirs(dst)
    tmp = dst.parent / f"{dst.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    mark_owned(tmp)
    return tmp


def remove_tree(path: Path, *, attempts: int = 5) -> bool:
    """rmtree that retries (a file may reappear while a writer thread winds down); True if `path` is gone."""
    for i in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            return True
        time.sleep(0.05 * (i + 1))
    return not os.path.lexists(path)


# --------------------------------------------------------------------------------------------------------- signals
@contextlib.contextmanager
def deferred_signals(signals=(signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Holds SIGINT / SIGTERM during the block and raises :class:`Interrupted` after it (nothing is deferred off
    the main thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {}

    def hold(signum, frame):  # noqa: ARG001
        received.append(signum)

    for s in signals:
        previous[s] = signal.signal(s, hold)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if received:
        raise Interrupted(received[0])


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Interrupted` like Ctrl-C, so the same cleanup runs (CLIs)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupt(signum, frame):  # noqa: ARG001
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------------------------------------- digests
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def list_files(root: Path, exclude: Iterable[str] = ()) -> list[str]:
    """Every regular file under root as a sorted POSIX relative path, minus `exclude`."""
    skip = set(exclude) | {OWNER_FILE}
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            rel = Path(dirpath, f).relative_to(root).as_posix()
            if rel not in skip:
                out.append(rel)
    return sorted(out)


def file_digests(root: Path, exclude: Iterable[str] = ()) -> dict[str, dict]:
    """{relative path: {"size": bytes, "sha256": hex}} of every file under root (threads over files)."""
    names = list_files(root, exclude)
    with ThreadPoolExecutor(_threads()) as pool:
        digests = list(pool.map(lambda n: sha256_file(root / n), names))
    return {n: {"size": (root / n).stat().st_size, DIGEST: d} for n, d in zip(names, digests)}


ALWAYS_HASH_BELOW = 1 << 20


def verify_files(root: Path, recorded: Mapping[str, Mapping], *, where: str, digests: bool = True,
                 strict_under: Iterable[str] = (), error=GptOssError) -> None:
    """Checks that every recorded file exists with its size, that no unrecorded file sits under the `strict_under`
    folders, and the SHA-256 of every file below 1 MiB (config.json, Orbax metadata and manifests: what decides how
    the rest is read) — and of all files when `digests`. Raises `error` naming the first bad file."""
    for rel, info in recorded.items():
        p = root / rel
        if not p.is_file():
            raise error(f"{p}: missing (listed in {where})")
        size = p.stat().st_size
        if size != info["size"]:
            raise error(f"{p}: {size} bytes but {where} records {info['size']} (truncated or modified file)")
    for sub in strict_under:
        extra = [f"{sub}/{n}" for n in list_files(root / sub)] if (root / sub).is_dir() else []
        extra = [n for n in extra if n not in recorded]
        if extra:
            raise error(f"{root / extra[0]}: not part of the checkpoint ({len(extra)} unrecorded file(s) under "
                        f"{root / sub}, not listed in {where})")
    names = sorted(n for n, info in recorded.items() if digests or info["size"] < ALWAYS_HASH_BELOW)
    with ThreadPoolExecutor(_threads()) as pool:
        got = list(pool.map(lambda n: sha256_file(root / n), names))
    for n, d in zip(names, got):
        if d != recorded[n][DIGEST]:
            raise error(f"{root / n}: SHA-256 does not match {where} (corrupted or modified file); reconvert or "
                        f"restore it")


__all__ = ["user_path", "check_destination", "DestinationError", "Interrupted", "make_temp_dir",
           "clean_stale_temp_dirs", "remove_own_temp_dirs", "remove_tree", "mark_owned", "deferred_signals",
           "sigterm_as_interrupt",
           "file_digests", "verify_files", "sha256_file", "list_files", "OWNER_FILE"]
