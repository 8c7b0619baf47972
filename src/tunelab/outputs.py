"""Where commands write: a target is new, or replaced only when asked, only when it is the same
command's earlier output, and never when it is (or holds) an input of the same call.

`check_target` runs before any work; the commit itself (atomic.atomic_dir / atomic_path with
replace=False) refuses a target that appeared meanwhile.
"""

from pathlib import Path

from tunelab.errors import UserError


def _resolved(path):
    return Path(path).expanduser().resolve()


def check_target(target, flag, *, overwrite, inputs=(), marker=None, command=None):
    """Refuse to write `target` (given as `flag`) when that could destroy something the user had.

    inputs: (what, path) pairs this command reads; the target may be none of them nor hold one.
    marker: the file that every output of `command` holds; --overwrite replaces only such a folder.
    Returns True when an existing target is to be replaced."""
    target = Path(target)
    where = _resolved(target)
    for what, path in inputs:
        if not path:
            continue
        source = _resolved(path)
        if where == source or where in source.parents:
            relation = "is" if where == source else "holds"
            raise UserError(f"{flag} {target}: {relation} {what} {path}, which this command reads; "
                            f"choose another {flag}")
    if not target.exists() and not target.is_symlink():
        return False
    if not target.is_dir() or target.is_symlink():
        raise UserError(f"{flag} {target}: exists and is not a folder; choose another {flag}")
    if not any(target.iterdir()):
        return False
    if not overwrite:
        raise UserError(f"{flag} {target}: already exists and is not empty; choose another {flag}, or pass "
                        "--overwrite to replace it")
    if marker and not (target / marker).is_file():
        raise UserError(f"{flag} {target}: was not made by `tunelab {command}` (it has no {marker}), so "
                        f"--overwrite does not replace it; choose another {flag} or remove it yourself")
    return True
