"""Plumbing shared by training, export and the benchmarks: atomic writes, versions, CPU flags.

Every output file of the project goes through `atomic_write_*` (a temp file in
the same directory, then `os.replace`): readers see the old file or the whole
new one, and a crash never leaves half a file where a good one was.
"""

import contextlib
import logging
import os
import platform
import tempfile
from pathlib import Path

__all__ = [
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path, suffix=""):
    """Yield a temp path beside `path`; on success it replaces `path`, on error it is removed.

    `suffix` keeps the extension writers look at (Keras picks the format of
    `model.save` from it, matplotlib that of `savefig`).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        if os.path.isfile(tmp):
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
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
