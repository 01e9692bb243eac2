"""Plumbing shared by training, export and the benchmarks: atomic writes, versions, CPU flags.

Every output file of the project goes through `atomic_write_*` (a temp file in
the same directory, then `os.replace`): readers see the old file or the whole
new one, and a crash never leaves half a file where a good one was.
"""

import contextlib
import errno
import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path

__all__ = [
    "EXIT_WRITE_ERROR",
    "OutputWriteError",
    "write_error",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "bf16_cpu_flags",
    "cpu_flags",
    "library_versions",
    "quiet_larq",
    "refuse_contradictions",
    "save_figure_atomic",
    "save_model_atomic",
]


def _is_tf_write_error(err) -> bool:
    """TensorFlow's errors for a failed write (a SavedModel, a checkpoint), without
    importing TensorFlow here."""
    return type(err).__module__.startswith("tensorflow") and type(err).__name__ in (
        "ResourceExhaustedError", "UnknownError", "PermissionDeniedError", "InternalError",
        "FailedPreconditionError", "DataLossError")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class OutputWriteError(OSError):
    """An output could not be written; the message names the path, the cause and the fix.

    Commands exit with EXIT_WRITE_ERROR (74, EX_IOERR of sysexits.h) on it.
    """


EXIT_WRITE_ERROR = 74


def write_error(path, err) -> OutputWriteError:
    """The one-line error for a failed write of `path` (an OSError or TensorFlow's OpError)."""
    if isinstance(err, OutputWriteError):
        return err
    text = str(getattr(err, "message", "") or err)
    if getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in text:
        cause, fix = ("no space left on device", "Free space on that disk or give another "
                      "output directory, then run the same command again")
    elif getattr(err, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS):
        cause, fix = (os.strerror(err.errno).lower(), "Make the directory writable or give "
                      "another output directory, then run the same command again")
    else:
        cause = (text.strip().splitlines() or [type(err).__name__])[-1][:200]
        fix = "Check the disk and the directory, then run the same command again"
    return OutputWriteError(f"cannot write {path}: {cause}. {fix}; nothing written before "
                            "this was lost.")


@contextlib.contextmanager
def atomic_path(path, suffix=""):
    """Yield a temp path beside `path`; on success it replaces `path`, on error it is removed.

    `suffix` keeps the extension writers look at (Keras picks the format of
    `model.save` from it, matplotlib that of `savefig`).
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    except OSError as err:
        raise write_error(path, err) from err
    os.close(fd)
    try:
        yield tmp
        if os.path.isfile(tmp):
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            if os.path.isdir(tmp):
                shutil.rmtree(tmp)
            else:
                os.unlink(tmp)
        if isinstance(err, OutputWriteError):
            raise
        if isinstance(err, OSError) or _is_tf_write_error(err):
            raise write_error(path, err) from err
        raise


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write `data` to `path` atomically (fsynced before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_model_atomic(model, path) -> Path:
    """`model.save(path)` through a temp file with the same extension (`.keras`, `.h5`)."""
    with atomic_path(path, suffix=Path(path).suffix) as tmp:
        model.save(tmp)
    return Path(path)


def save_figure_atomic(fig, path, **savefig_kwargs) -> Path:
    """`fig.savefig(path)` atomically; the format comes from the extension of `path`."""
    with atomic_path(path, suffix=Path(path).suffix) as tmp:
        fig.savefig(tmp, **savefig_kwargs)
    return Path(path)


@contextlib.contextmanager
def quiet_larq():
    """Silence Larq's warning that a binary kernel has no constraint while building or loading.

    Bi-Real's binary kernels are unconstrained on purpose (the authors zero the
    gradient outside [-1, 1] instead of clipping the weights).
    """
    logger = logging.getLogger("larq.layers_base")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def library_versions() -> dict:
    """Versions of Python and the pinned stack, for reports and summaries."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("tensorflow", "tf-keras", "larq", "larq-zoo", "larq-compute-engine", "numpy",
                 "tensorflow-datasets"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_flags() -> set:
    """The instruction-set flags of this CPU (Linux /proc/cpuinfo); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_cpu_flags(flags=None) -> list:
    """The bfloat16 instruction sets among `flags` (default: this CPU's), e.g. ["amx_bf16"]."""
    return sorted((cpu_flags() if flags is None else set(flags)) & {"avx512_bf16", "amx_bf16"})


def refuse_contradictions(kwargs, fixed, what):
    """Raise ValueError if `kwargs` sets any of `fixed` to another value (pretrained
    weights fix some arguments of the network they load into)."""
    bad = {k: v for k, v in kwargs.items() if k in fixed and v != fixed[k]}
    if bad:
        wanted = ", ".join(f"{k}={fixed[k]!r}" for k in bad)
        got = ", ".join(f"{k}={v!r}" for k, v in bad.items())
        raise ValueError(f"{got} contradicts {what}, which need {wanted}; leave them out.")
