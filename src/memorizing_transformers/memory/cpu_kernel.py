"""The CPU kernel of the exact and IVF searches (topk_kernel.cpp), compiled on first use by PyTorch's
extension builder, once per source, flags, torch and Python version, into $TORCH_EXTENSIONS_DIR (else
~/.cache/torch_extensions): `make setup` compiles it, about a minute. Where it cannot be built
(no C++ compiler), the exact search runs on PyTorch ops alone and the ivf backend searches exactly,
with one warning saying why.

A build that is killed leaves no stale lock behind: builds take a lock the system releases with
the process (filelock), and a later one goes ahead. A built kernel is imported straight from its
library, with no lock at all.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

_SOURCE = Path(__file__).with_name("topk_kernel.cpp")
_FLAGS = ["-O3", "-fopenmp"]


def _import(name: str, library: Path) -> ModuleType | None:
    """The built kernel, or None where its library is missing or half-written (by a killed build)."""
    if not library.exists():
        return None
    spec = importlib.util.spec_from_file_location(name, library)
    try:
        module = importlib.util.module_from_spec(spec)  # an extension module is loaded here
        spec.loader.exec_module(module)
    except ImportError:
        return None
    return module


def library_path() -> tuple[str, Path]:
    """The kernel's module name and where its library is (or will be) built."""
    import torch
    from torch.utils import cpp_extension

    identity = [_SOURCE.read_text(), *_FLAGS, torch.__version__, sys.version]
    name = "memorizing_transformers_topk_" + hashlib.sha256("\0".join(identity).encode()).hexdigest()[:16]
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    return name, root / name / f"{name}.so"


def _build() -> ModuleType:
    from filelock import FileLock
    from torch.utils import cpp_extension

    name, library = library_path()
    if (module := _import(name, library)) is not None:
        return module
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise RuntimeError("no C++ compiler on PATH (install g++, or set CXX)")
    library.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(library.parent.with_suffix(".lock")):
        if (module := _import(name, library)) is not None:  # built by another process meanwhile
            return module
        library.unlink(missing_ok=True)  # half-written by a killed build, if there
        print("compiling the exact search's CPU kernel, once (about a minute)", file=sys.stderr, flush=True)
        (library.parent / "lock").unlink(missing_ok=True)  # PyTorch's own lock, left by a build that was killed
        # The ninja that PyTorch's builder runs may be the one installed beside this interpreter.
        path = os.environ.get("PATH", "")
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), path])
        try:
            return cpp_extension.load(
                name, [str(_SOURCE)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
                build_directory=str(library.parent), verbose=False,
            )  # fmt: skip
        finally:
            os.environ["PATH"] = path


@functools.cache
def topk_kernel() -> ModuleType | None:
    """The compiled kernel module, or None where it cannot be built (warned about once)."""
    try:
        return _build()
    except Exception as error:  # a missing compiler or a failed build: the PyTorch search still works
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(
            f"the exact search's CPU kernel could not be built ({reason}); searching with PyTorch ops "
            "instead (1.7x slower at 64K entries, 2.5x at 262K, in benchmarks.search), and the ivf backend exactly",
            stacklevel=2,
        )
        return None
