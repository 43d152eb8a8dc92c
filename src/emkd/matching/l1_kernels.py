"""Backends of the L1 matching cost (EM-KD Eq. 2): ``out += sum_f |a_f - b_f|`` for every student / teacher row pair.

* ``"cdist"``: ``torch.cdist(p=1)``, any device; the reference every other backend is tested against.
* ``"numba"``: a register-blocked CPU kernel (:mod:`emkd.matching._l1_numba`), about 8x faster than ``cdist`` at the
  paper's scale on this project's machine (``benchmarks/l1_bench.py``, docs/performance.md section 5). Needs the
  optional dependency ``numba`` (``pip install 'emkd[fast]'``); numba compiles it on first use and caches the machine
  code on disk, so later processes load it in well under a second.
* ``"triton"``: a tiled GPU kernel (:mod:`emkd.matching._l1_triton`) for CUDA tensors. Needs the optional dependency
  ``triton`` (``pip install 'emkd[gpu]'``). With ``TRITON_INTERPRET=1`` in the environment, Triton's interpreter runs
  the same kernel on tensors of any device, CPU included (slowly: for tests); it has not been timed on a GPU yet.
* ``"auto"`` (the default everywhere): ``numba`` when every tensor is on the CPU and numba imports, else ``cdist``.
  It does not pick ``triton``: the kernel has not been timed on a GPU, so on CUDA ``cdist`` stays the default until
  a GPU run shows the kernel is faster (``benchmarks/l1_bench.py --device cuda --backends cdist,triton``).

The backends sum in float32 in different orders: costs agree within 1e-5 relative, not bit for bit
(``tests/test_l1_kernels.py`` and ``tests/test_l1_triton.py`` check that, and that the Hungarian assignments are the
same).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

BACKENDS = ("auto", "cdist", "numba", "triton")

#: the compiled backends: their module, the optional dependency it needs, and the extra that installs it
_OPTIONAL = {
    "numba": ("emkd.matching._l1_numba", "numba", "fast"),
    "triton": ("emkd.matching._l1_triton", "triton", "gpu"),
}
#: each compiled backend's module once imported, or why it did not import; tried once per process
_KERNELS: dict[str, ModuleType | str] = {}


def _kernels(backend: str) -> ModuleType | str:
    """The module of a compiled backend, or the one-line reason it does not import (its dependency missing, or
    refusing this NumPy / machine)."""
    if backend not in _KERNELS:
        try:
            _KERNELS[backend] = importlib.import_module(_OPTIONAL[backend][0])
        except (ImportError, OSError, RuntimeError) as err:
            _KERNELS[backend] = f"{type(err).__name__}: {err}"
    return _KERNELS[backend]


def numba_available() -> bool:
    """Whether the numba kernel imports (numba installed and compatible with this NumPy)."""
    return isinstance(_kernels("numba"), ModuleType)


def triton_available() -> bool:
    """Whether the Triton kernel imports (triton installed and importable)."""
    return isinstance(_kernels("triton"), ModuleType)


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """``"cdist"``, ``"numba"`` or ``"triton"`` for ``backend`` and the devices of ``tensors`` (see the module
    docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"L1 cost backend must be one of {BACKENDS}, got {backend!r}")
    on_cpu = all(t.device.type == "cpu" for t in tensors)
    on_cuda = bool(tensors) and all(t.device.type == "cuda" for t in tensors)
    if backend == "auto":
        return "numba" if on_cpu and numba_available() else "cdist"
    if backend == "numba":
        _require("numba")
        if not on_cpu:
            devices = sorted({str(t.device) for t in tensors})
            raise ValueError(f"L1 cost backend='numba' runs on CPU tensors only, got tensors on {devices}")
    if backend == "triton":
        kernels = _require("triton")
        if not on_cuda and not kernels.interpreting():
            devices = sorted({str(t.device) for t in tensors})
            raise ValueError(
                f"L1 cost backend='triton' runs on CUDA tensors only (or on any device with TRITON_INTERPRET=1, "
                f"Triton's slow interpreter), got tensors on {devices}; pass backend='auto' or 'cdist' instead"
            )
    return backend


def _require(backend: str) -> ModuleType:
    """The kernel module of ``backend``, or an ImportError that says how to get it."""
    kernels = _kernels(backend)
    if isinstance(kernels, ModuleType):
        return kernels
    _, package, extra = _OPTIONAL[backend]
    raise ImportError(
        f"L1 cost backend='{backend}' needs {package}, which did not import ({kernels}); install it with "
        f"`pip install 'emkd[{extra}]'`, or pass backend='cdist' (or 'auto', which falls back to cdist)"
    )


@torch.no_grad()
def l1_accumulate(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, backend: str) -> None:
    """``out[..., i, j] += sum_f |a[..., i, f] - b[..., j, f]|`` in place (no gradient).

    Args:
        a: ``[Ns, F]`` or ``[G, Ns, F]`` float32 (student rows).
        b: ``[Nt, F]`` or ``[G, Nt, F]`` float32 (teacher rows), the same leading shape as ``a``.
        out: ``[Ns, Nt]`` or ``[G, Ns, Nt]`` float32, C-contiguous.
        backend: ``"cdist"``, ``"numba"`` or ``"triton"``, as :func:`resolve_backend` returns it.
    """
    if backend == "cdist":
        out += torch.cdist(a, b, p=1.0)
        return
    if backend == "triton":
        _require("triton").l1_accumulate(a, b, out)
        return
    if backend != "numba":
        raise ValueError(
            f"l1_accumulate: backend must be 'cdist', 'numba' or 'triton' (resolve 'auto' first), got {backend!r}"
        )
    kernels = _require("numba")
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"l1_accumulate: out must be C-contiguous float32, got {out.dtype}, strides {out.stride()}")
    if out.numel() == 0:  # no pairs
        return
    a3 = a.detach().float().contiguous().reshape(-1, *a.shape[-2:])  # (G, Ns, F)
    b3 = b.detach().float().contiguous().reshape(-1, *b.shape[-2:])  # (G, Nt, F)
    out3 = out.view(-1, *out.shape[-2:])  # (G, Ns, Nt), shares out's memory
    with kernels.threads(torch.get_num_threads()):  # as many threads as torch's intra-op pool, not more
        kernels.l1_accumulate(a3.numpy(), b3.numpy(), out3.numpy())
