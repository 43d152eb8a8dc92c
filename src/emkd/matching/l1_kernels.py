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

from types import ModuleType

import torch

BACKENDS = ("auto", "cdist", "numba", "triton")

_numba_kernels: ModuleType | None = None
_numba_error: str | None = None
_triton_kernels: ModuleType | None = None
_triton_error: str | None = None


def numba_available() -> bool:
    """Whether the numba kernel imports (numba installed and compatible with this NumPy); tried once per process."""
    global _numba_kernels, _numba_error
    if _numba_kernels is None and _numba_error is None:
        try:
            from emkd.matching import _l1_numba
        except ImportError as err:  # numba missing, or refusing this NumPy
            _numba_error = f"{type(err).__name__}: {err}"
        else:
            _numba_kernels = _l1_numba
    return _numba_kernels is not None


def triton_available() -> bool:
    """Whether the Triton kernel imports (triton installed and importable); tried once per process."""
    global _triton_kernels, _triton_error
    if _triton_kernels is None and _triton_error is None:
        try:
            from emkd.matching import _l1_triton
        except (ImportError, OSError, RuntimeError) as err:  # triton missing, or failing to load on this machine
            _triton_error = f"{type(err).__name__}: {err}"
        else:
            _triton_kernels = _l1_triton
    return _triton_kernels is not None


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
        _require_numba()
        if not on_cpu:
            devices = sorted({str(t.device) for t in tensors})
            raise ValueError(f"L1 cost backend='numba' runs on CPU tensors only, got tensors on {devices}")
    if backend == "triton":
        kernels = _require_triton()
        if not on_cuda and not kernels.interpreting():
            devices = sorted({str(t.device) for t in tensors})
            raise ValueError(
                f"L1 cost backend='triton' runs on CUDA tensors only (or on any device with TRITON_INTERPRET=1, "
                f"Triton's slow interpreter), got tensors on {devices}; pass backend='auto' or 'cdist' instead"
            )
    return backend


def _require_numba() -> ModuleType:
    """The kernel module, or an ImportError that says how to get it."""
    if not numba_available():
        raise ImportError(
            f"L1 cost backend='numba' needs numba, which did not import ({_numba_error}); install it with "
            "`pip install 'emkd[fast]'`, or pass backend='cdist' (or 'auto', which falls back to cdist)"
        )
    return _numba_kernels


def _require_triton() -> ModuleType:
    """The Triton kernel module, or an ImportError that says how to get it."""
    if not triton_available():
        raise ImportError(
            f"L1 cost backend='triton' needs triton, which did not import ({_triton_error}); install it with "
            "`pip install 'emkd[gpu]'`, or pass backend='cdist' (or 'auto', which falls back to cdist)"
        )
    return _triton_kernels


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
        _require_triton().l1_accumulate(a, b, out)
        return
    if backend != "numba":
        raise ValueError(
            f"l1_accumulate: backend must be 'cdist', 'numba' or 'triton' (resolve 'auto' first), got {backend!r}"
        )
    kernels = _require_numba()
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"l1_accumulate: out must be C-contiguous float32, got {out.dtype}, strides {out.stride()}")
    if out.numel() == 0:  # no pairs
        return
    a3 = a.detach().float().contiguous().reshape(-1, *a.shape[-2:])  # (G, Ns, F)
    b3 = b.detach().float().contiguous().reshape(-1, *b.shape[-2:])  # (G, Nt, F)
    out3 = out.view(-1, *out.shape[-2:])  # (G, Ns, Nt), shares out's memory
    with kernels.threads(torch.get_num_threads()):  # as many threads as torch's intra-op pool, not more
        kernels.l1_accumulate(a3.numpy(), b3.numpy(), out3.numpy())
