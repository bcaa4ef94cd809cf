"""Atomic file and directory writes: write under a temporary name, fsync, rename.

A crash or kill at any moment leaves either the old content or the new, never a half-written file or directory.
Temporary names carry the host and process id (``.NAME.tmp-HOST-PID-XXXX``), so the next directory write to the same
place removes what a process that died left there (files are not scanned for: a directory listing per file write would
cost too much where thousands of shards are written, and a killed file write leaves at most one file's size behind).
Results get the permissions the umask gives any new file (``mkstemp``/``mkdtemp`` create them private, 0600/0700).
Write failures are reported as ``OSError`` naming the output path, not the temporary one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from herd.errors import OutputExistsError

_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (setting it to read it races with threads
    that create files meanwhile)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_prefix(name: str) -> str:
    return f".{name}.tmp-{_HOST}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def remove_stale_temps(dst: str | os.PathLike) -> None:
    """Remove the temporaries that processes on this host which have since died left beside ``dst`` (a killed
    ``herd convert`` or ``herd data tokenize``). A previous ``dst`` that was moved aside for an overwrite and never
    replaced (the process died between the two renames) is put back."""
    dst = Path(dst)
    pattern = re.compile(re.escape(f".{dst.name}.tmp-{_HOST}-") + r"(\d+)-(.+)")
    try:
        entries = [e for e in os.scandir(dst.parent) if e.name.startswith(f".{dst.name}.tmp-")]
    except OSError:
        return
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        path = Path(entry.path)
        with contextlib.suppress(OSError):
            if m.group(2) == "old" and not dst.exists():
                os.replace(path, dst)
            elif entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink()


def _as_os_error(e: BaseException, path: Path, tmp: Path | None = None) -> BaseException:
    """``e`` as an ``OSError`` naming ``path`` (the user's output, not our temporary), where it is a write failure.

    Writers outside Python's I/O report a full disk in their own words: torch.save as "unexpected pos A vs B" (a short
    write), safetensors as "... (os error 28)"."""
    if isinstance(e, OSError) and not isinstance(e, OutputExistsError):
        name = e.filename
        if name is None or Path(name).name.startswith(_temp_prefix(path.name)):  # our temporary's own name
            name = path
        elif tmp is not None and str(name).startswith(str(tmp)):
            name = str(path) + str(name)[len(str(tmp)):]
        return OSError(e.errno, e.strerror or str(e), str(name))
    text = str(e)
    if "No space left" in text or "os error 28" in text or (isinstance(e, RuntimeError) and "unexpected pos" in text):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return e


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a directory entry (a rename or a new file) on POSIX file systems."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; a file it replaces keeps its mode, a new one gets the umask's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~current_umask()
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), dir=path.parent)
    except OSError as e:
        raise _as_os_error(e, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        err = _as_os_error(e, path)
        if err is e:
            raise
        raise err from None
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError) -> Any:
    """Parse a JSON file; a missing or malformed file raises ``error`` naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None


def fsync_tree(root: str | os.PathLike) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


def check_new_output(dst: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise ``OutputExistsError`` unless ``dst`` is absent or an empty directory (or ``overwrite``): called by
    ``atomic_directory``, and before long work so it fails before the work, not after."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        if not dst.is_dir() or any(dst.iterdir()):
            raise OutputExistsError(f"{dst}: output exists and is not an empty directory (refusing to overwrite)")


def publish_modes(root: str | os.PathLike) -> None:
    """Give a directory tree the permissions new files get under the umask (0777/0666 minus umask; executables
    keep their x bits), as if it had been created in place rather than through private temporaries."""
    umask = current_umask()
    dir_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    os.chmod(root, dir_mode)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), dir_mode)
        for name in filenames:
            file = os.path.join(dirpath, name)
            if not os.path.islink(file):
                executable = os.stat(file).st_mode & 0o111
                os.chmod(file, (file_mode | (executable & ~umask)) if executable else file_mode)


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``dst``; on success fsync it and rename it to ``dst``.

    ``dst`` must not exist, or be an empty directory, unless ``overwrite``. On error the temporary directory is removed
    and ``dst`` is untouched. Temporaries of dead processes left beside ``dst`` are removed first.
    """
    dst = Path(dst)
    check_new_output(dst, overwrite)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(dst)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dst.name), dir=dst.parent))
    except OSError as e:
        raise _as_os_error(e, dst) from None
    try:
        yield tmp
        fsync_tree(tmp)
        publish_modes(tmp)
        if dst.exists():
            old = dst.with_name(f"{_temp_prefix(dst.name)}old")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = _as_os_error(e, dst, tmp)
        if err is e:
            raise
        raise err from None
