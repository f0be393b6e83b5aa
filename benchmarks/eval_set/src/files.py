"""Writing files safely."""

import os
import tempfile


def write_file_atomically(path, data):
    """Replace the file at `path` with `data` (bytes) so readers see the old or the new file, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, temp_path = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as temp:
            temp.write(data)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_path, path)
    except BaseException:
        os.unlink(temp_path)
        raise
