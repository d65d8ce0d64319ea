"""The exact search's CPU kernel (topk_kernel.cpp), compiled on first use by PyTorch's extension
builder and cached by it (in $TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions): `make setup`
compiles it once, about a minute. Where it cannot be built (no C++ compiler), the exact search
runs on PyTorch ops alone, with one warning saying why.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

_NAME = "memorizing_transformers_topk"
_SOURCE = Path(__file__).with_name("topk_kernel.cpp")
_loaded: dict[str, ModuleType | None] = {}


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise RuntimeError("no C++ compiler on PATH (install g++, or set CXX)")
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", cpp_extension.get_default_build_root()))
    if not any(root.glob(f"**/{_NAME}*.so")):
        print("compiling the exact search's CPU kernel, once (about a minute)", file=sys.stderr, flush=True)
    # The ninja that PyTorch's builder runs may be the one installed beside this interpreter.
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), path])
    try:
        return cpp_extension.load(
            _NAME, [str(_SOURCE)], extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False
        )
    finally:
        os.environ["PATH"] = path


def topk_kernel() -> ModuleType | None:
    """The compiled kernel module, or None where it cannot be built (warned about once)."""
    if _NAME not in _loaded:
        try:
            _loaded[_NAME] = _build()
        except Exception as error:  # a missing compiler or a failed build: the PyTorch search still works
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            warnings.warn(
                f"the exact search's CPU kernel could not be built ({reason}); "
                "searching with PyTorch ops instead (about 1.5x slower at 64K entries)",
                stacklevel=2,
            )
            _loaded[_NAME] = None
    return _loaded[_NAME]
