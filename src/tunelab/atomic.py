"""Atomic writes: a file or folder appears complete under its final name, or not at all.

Everything is written beside its destination under a temporary name that carries the writer's
process id (`.<name>.<pid>.<random>.tmp`), flushed, then renamed into place (atomic on one file
system). A failure leaves the previous version untouched and removes the temporary; the
temporaries of a writer that was killed are removed by the next write to the same name, once
their process is gone. With `replace=False` the commit itself refuses a destination that
appeared meanwhile (no check-then-replace race). Files and folders get the modes the umask
gives (tempfile alone would make them 0600 / 0700).
"""

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from tunelab.errors import UserError


def umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder, name=None):
    """Remove temporaries of killed writers in `folder` (of `name` only, when given); returns their count."""
    pattern = re.compile(rf"^\.{re.escape(name) if name else '.+'}\.(\d+)\.[^.]+\.(tmp|old)$")
    removed = 0
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in Path(folder).iterdir():
            match = pattern.match(entry.name)
            if not match or _alive(int(match.group(1))):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            removed += 1
    return removed


def _prefix(dest):
    return f".{dest.name}.{os.getpid()}."


def _exists_error(dest):
    return UserError(f"{dest}: appeared while this command was writing it; nothing was replaced. Choose another "
                     "output or pass --overwrite")


@contextlib.contextmanager
def atomic_path(dest, replace=True):
    """Yield a temporary path beside `dest`; on success it becomes `dest` in one step.

    replace=False: an existing `dest` at the commit is an error and stays as it was."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dest.parent, dest.name)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(dest), suffix=".tmp", dir=dest.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~umask())
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, dest)
        else:
            try:
                os.link(tmp, dest)   # fails when dest exists, unlike rename
            except FileExistsError:
                raise _exists_error(dest) from None
            except OSError as e:     # no hard links on this file system
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                if os.path.lexists(dest):
                    raise _exists_error(dest) from None
                os.replace(tmp, dest)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(dest, text, replace=True):
    with atomic_path(dest, replace=replace) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_json(dest, obj, replace=True):
    write_text(dest, json.dumps(obj, indent=2, ensure_ascii=False) + "\n", replace=replace)


def save_safetensors(tensors, path, metadata=None):
    """safetensors' save_file, its I/O failures (a full disk) raised as the OSError they are."""
    from safetensors.numpy import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as e:   # safetensors' own error type carries the OS error in its text
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def copy_file(source, dest):
    """Copy `source` over `dest` atomically."""
    with atomic_path(dest) as tmp:
        shutil.copyfile(source, tmp)


def fsync_tree(folder):
    """Flush every file under `folder` (and the folder entries) to disk."""
    for path in sorted(Path(folder).rglob("*")) + [Path(folder)]:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@contextlib.contextmanager
def atomic_dir(dest, replace=True):
    """Yield a temporary folder beside `dest`; on success it takes `dest`'s place.

    replace=True: an existing `dest` is moved aside first and deleted only after the new folder is
    in place, so at every moment either the old or the new complete folder sits at `dest`.
    replace=False: the commit is one rename, which fails (and changes nothing) when a non-empty
    `dest` appeared meanwhile.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dest.parent, dest.name)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(dest), suffix=".tmp", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~umask())
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not replace:
        try:
            os.rename(tmp, dest)   # replaces an empty folder only
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise _exists_error(dest) from None
            raise
        return
    old = set_aside(dest) if dest.exists() else None
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def set_aside(dest):
    """Move `dest` to a temporary name beside it (removed as stale once this process is gone); return it."""
    dest = Path(dest)
    aside = Path(tempfile.mkdtemp(prefix=_prefix(dest), suffix=".old", dir=dest.parent))
    os.rmdir(aside)
    os.replace(dest, aside)
    return aside
