"""Writing files and folders so that a crash, a kill or a power loss never leaves a half-written one."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def write_atomically(path: Path, write: Callable[[str], object]) -> None:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it over `path`.

    The file's data and then its folder are flushed to disk (fsync) before and after the
    rename, so a crash or a power loss at any moment leaves either the previous file or the
    new one, whole. The file gets the usual permissions of a new file (0o666 less the umask),
    not the temporary file's private 0o600. A full disk is reported as such (`OSError`
    ENOSPC naming `path`), whatever the writer raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:
            write(tmp)
            _fsync_file(tmp)
        except BaseException as err:
            raise disk_full_error(path, err) or err
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """A temporary folder beside `final` to fill; on success it is published as `final`
    (`publish_dir`), on an error removed, leaving any older `final` as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        try:
            yield tmp
        except BaseException as err:
            raise disk_full_error(final, err) or err
        publish_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename the complete folder `tmp` to `final` (replacing an older `final`), durably.

    Every file in `tmp` is flushed first, and the parent folder after the rename. An older
    `final` is moved aside, not deleted, until the new one is in place: a crash at any
    moment leaves one whole folder at `final` or beside it (`.<name>.old*`, removed by the
    next publish)."""
    for file in tmp.rglob("*"):
        if file.is_file():
            _fsync_file(file)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes private 0o700 folders
    fsync_dir(tmp)
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old", dir=final.parent))
        os.replace(final, old / final.name)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_dir(directory: Path) -> None:
    """Flush a folder's entries (renames, new files) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_full_error(path: Path, err: BaseException) -> OSError | None:
    """An OSError that says "no space left on device" when `err` is a full disk in disguise
    (torch.save and safetensors report one in their own words), else None."""
    text = str(err)
    full = (isinstance(err, OSError) and err.errno == errno.ENOSPC) or any(
        marker in text for marker in ("No space left", "StorageFull", "code: 28", "os error 28")
    )
    if not full and "unexpected pos" in text:  # torch.save's PytorchStreamWriter on a failed write
        full = shutil.disk_usage(path.parent).free < 1 << 20
    if not full:
        return None
    return OSError(errno.ENOSPC, f"no space left on device while writing {path}")


def _umask() -> int:
    """The process's umask (reading it means setting it: it is put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
