"""Write files so that a reader never sees half of one, and an unchanged file is left alone.

A killed build must leave only whole files (the next build resumes from the cache), and a rebuild
with nothing changed must keep every byte and every mtime, so Jekyll and rsync see no change.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from explainer.errors import UserError

# Temp files start with this prefix, so a crash leftover is easy to recognise; Jekyll also
# skips names that start with a dot.
TEMP_PREFIX = ".explainer-tmp-"


def check_inside(path: str | os.PathLike, folder: Path) -> None:
    """Refuse `path` if, with every symlink along it resolved, it is not inside `folder`: a folder that
    someone else made (a site to build) may hold a link out of it, and nothing may be written through one."""
    resolved, folder = Path(path).resolve(), folder.resolve()
    if resolved != folder and folder not in resolved.parents:
        raise UserError(
            f"{path} leads to {resolved}, outside {folder}, through a symlink; nothing is written "
            f"through it: remove the link, or pass --trust-config if you trust this site"
        )


def write_atomic(path: str | os.PathLike, content: str | bytes, *, inside: Path | None = None) -> bool:
    """Write `content` (str is encoded as UTF-8) to `path` atomically; create parent folders.
    With `inside`, refuse (check_inside) a path whose folder leads out of that folder through a symlink;
    a symlink at `path` itself is replaced, not followed.

    Returns True if the file was written, False if it already held exactly these bytes (then
    it is not touched, so its mtime stays the same).
    """
    path = Path(path)
    if inside is not None:
        check_inside(path.parent, inside)
    data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
    try:
        if path.read_bytes() == data:
            return False
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the target: os.replace is only atomic within one file system.
    # Mode 0o666 lets the umask decide, as a plain open() would.
    temp_path = path.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}-{path.name}"
    fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as temp:
            temp.write(data)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_path, path)
    except BaseException:  # includes KeyboardInterrupt: never leave the temp file behind
        temp_path.unlink(missing_ok=True)
        raise
    return True
