"""Exceptions with messages meant for the user: each names the problem and the fix."""
import errno as _errno


class FlexbatchError(Exception):
    """Base class of every error flexbatch raises on purpose."""


class ModelFormatError(FlexbatchError):
    """A model folder or file is missing something, or is of an unsupported kind."""


class WeightFileError(FlexbatchError):
    """A weight file is truncated, corrupted, or does not match the model's config."""


class ConfigError(FlexbatchError, ValueError):
    """A user-supplied setting is out of range or inconsistent."""


class StageLostError(FlexbatchError):
    """A pipeline stage's process stopped answering: not any request's fault; the job stops
    and the same command resumes it."""


class StorageError(FlexbatchError):
    """Reading or writing a file failed (disk full, read-only, no permission); the message
    names the file and the fix."""


ERRNO_FIXES = {
    _errno.ENOSPC: "free space on that disk, or use a folder on another disk",
    _errno.EDQUOT: "free space within your disk quota",
    _errno.EROFS: "the file system is read-only: use a folder on a writable disk",
    _errno.EACCES: "you lack permission: use a folder you can write to, or change its permissions",
    _errno.EPERM: "you lack permission: use a folder you can write to, or change its permissions",
    _errno.ENOENT: "check that the path exists",
}


def storage_error(e: OSError, path, doing: str, resumable: bool = False) -> StorageError:
    """A one-line error for an OSError: what failed, on which file, and what to do."""
    fix = ERRNO_FIXES.get(e.errno, "check the path and the disk")
    code = _errno.errorcode.get(e.errno, "") if e.errno else ""
    text = f"cannot {doing} {path}: {e.strerror or e}{f' ({code})' if code else ''}; {fix}."
    return StorageError(text + (" Finished results are kept: rerun the same command to resume." if resumable else ""))
