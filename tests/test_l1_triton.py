"""The Triton backend of the L1 cost (:mod:`emkd.matching._l1_triton`) against ``torch.cdist`` (the reference), run on
the CPU by Triton's interpreter (``TRITON_INTERPRET=1``): odd shapes whose blocks end part-way on every side, batches,
non-contiguous inputs, accumulation into a non-zero ``out``, empty sides, non-finite values, the same Hungarian
matches, ``head_l1_cost``; how ``resolve_backend`` chooses and refuses it; and, with no GPU either, that Triton's
compiler lowers the kernel to a cubin for sm_80 and sm_90 (the interpreter never compiles it).

triton is in the dev extra, so this module imports it unconditionally: a missing triton fails the run instead of
skipping these checks.

The interpreter only works if ``TRITON_INTERPRET=1`` was set before triton was imported: triton builds
``triton.language``'s own kernels (``tl.zeros``, ``tl.sum``, ...) at import, for the compiler or for the interpreter,
and a plain ``pytest`` run imports triton without it. So the kernel checks (the tests taking the ``interpreter``
fixture) run where triton was imported under the interpreter: in a plain run, ``tests/conftest.py`` deselects them and
``test_kernel_checks_in_a_fresh_interpreter_process`` runs them in a fresh ``pytest`` process that it starts with the
variable set (and fails unless every one of them passed there); under ``TRITON_INTERPRET=1 pytest tests/test_l1_triton.py``, in the same process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import triton  # required: see the module docstring
from scipy.optimize import linear_sum_assignment

from emkd.matching import _l1_triton, head_l1_cost, l1_cost, l1_kernels

LANGUAGE_INTERPRETED = _l1_triton.language_interpreted()  # triton was imported with TRITON_INTERPRET=1

# (Ns, Nt, F): blocks are 32 student x 32 teacher rows x 8 features, so these cover single rows, one partial block,
# exactly one block, a partial block on either side and both, several blocks per side and feature counts that are no
# multiple of 8.
ODD_SHAPES = [(1, 1, 1), (1, 40, 9), (3, 5, 47), (32, 32, 8), (33, 32, 17), (32, 33, 16), (45, 70, 13), (5, 3, 1)]


def naive_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[Ns, Nt]`` float64 ``sum_f |a[i, f] - b[j, f]|`` by broadcasting (small inputs only)."""
    return (a.double()[:, None, :] - b.double()[None, :, :]).abs().sum(-1)


def _rows(shape: tuple[int, ...], seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.fixture
def interpreter(monkeypatch):
    """Triton's interpreter on, triton imported under it: the kernel runs on CPU tensors (see the module docstring)."""
    if not LANGUAGE_INTERPRETED:  # tests/conftest.py deselects these checks then; never skip them
        pytest.fail("the kernel checks need triton imported under the interpreter: run them with TRITON_INTERPRET=1 "
                    "set, or select test_kernel_checks_in_a_fresh_interpreter_process with them")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _l1_triton.interpreting()


@pytest.fixture
def interpreter_variable(monkeypatch):
    """``TRITON_INTERPRET=1`` in the environment, whatever it was when triton was imported (no kernel is launched)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _l1_triton.interpreting()


@pytest.fixture
def compiled(monkeypatch):
    """Triton's interpreter off, as by default: the kernel needs CUDA tensors."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not _l1_triton.interpreting()


@pytest.fixture
def without_triton(monkeypatch):
    """The kernel module as if triton were not installed."""
    monkeypatch.setitem(l1_kernels._KERNELS, "triton", "ModuleNotFoundError: No module named 'triton'")


def _accumulate(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    l1_kernels.l1_accumulate(a, b, out, "triton")
    return out


# ---- triton kernel == cdist, under the interpreter -----------------------------------------------------------------
@pytest.mark.parametrize(("ns", "nt", "f"), ODD_SHAPES)
def test_triton_l1_cost_equals_cdist_on_odd_shapes(interpreter, ns, nt, f):
    a, b = _rows((ns, f), ns * 1000 + f), _rows((nt, f), nt * 1000 + f + 1)
    got = l1_cost(a, b, backend="triton")
    ref = l1_cost(a, b, backend="cdist")
    assert got.shape == (ns, nt) and got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), naive_l1(a, b), rtol=1e-5, atol=1e-4)


def test_triton_sums_features_over_many_blocks_and_chunks(interpreter):
    """2,053 features (257 feature steps, the last one partial), whole and in chunks of 500: within 1e-5 relative of
    float64."""
    a, b = _rows((3, 2053), 1), _rows((4, 2053), 2)
    ref = naive_l1(a, b)
    for chunk_size in (8192, 500):
        got = l1_cost(a, b, chunk_size=chunk_size, backend="triton")
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0, msg=f"chunk_size={chunk_size}")


def test_triton_accumulates_into_a_batched_out_in_place(interpreter):
    """``l1_accumulate`` adds to ``out`` (it does not overwrite it), one ``[Ns, Nt]`` block per leading index (one
    program column per sample on the grid)."""
    a, b = _rows((3, 37, 19), 5), _rows((3, 10, 19), 6)  # (G, Ns, F), (G, Nt, F)
    start = _rows((3, 37, 10), 7)
    out = _accumulate(a, b, start.clone())
    ref = start.double() + torch.stack([naive_l1(a[g], b[g]) for g in range(3)])
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out - start, torch.cdist(a, b, p=1.0), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        _accumulate(a, b, out.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="C-contiguous float32"):
        _accumulate(a, b, out.double())


def test_triton_reads_non_contiguous_inputs_through_their_strides(interpreter):
    a = _rows((23, 35), 8).T  # (35, 23): feature stride 35
    b = _rows((9, 46), 9)[:, ::2]  # (9, 23): feature stride 2
    assert not a.is_contiguous() and not b.is_contiguous()
    torch.testing.assert_close(_accumulate(a, b, torch.zeros(35, 9)), torch.cdist(a, b, p=1.0), rtol=1e-5, atol=1e-4)
    a3 = _rows((35, 2, 23), 10).transpose(0, 1)  # (2, 35, 23): sample stride 23
    b3 = _rows((2, 23, 9), 11).transpose(1, 2)  # (2, 9, 23): feature stride 9
    out = _accumulate(a3, b3, torch.zeros(2, 35, 9))
    torch.testing.assert_close(out, torch.cdist(a3, b3, p=1.0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("ns", "nt", "f"), [(0, 5, 8), (4, 0, 8), (0, 0, 8), (3, 4, 0)])
def test_triton_empty_sides_give_empty_or_zero_costs(interpreter, ns, nt, f):
    a, b = torch.randn(ns, f), torch.randn(nt, f)
    got = l1_cost(a, b, backend="triton")
    assert got.shape == (ns, nt)
    assert torch.equal(got, torch.zeros(ns, nt))
    start = torch.full((ns, nt), 2.5)
    assert torch.equal(_accumulate(a, b, start.clone()), start)  # nothing added, nothing overwritten


def test_triton_propagates_non_finite_values(interpreter):
    a, b = torch.randn(6, 9), torch.randn(4, 9)
    a[2, 3] = float("nan")
    b[1, 0] = float("inf")
    got, ref = l1_cost(a, b, backend="triton"), l1_cost(a, b, backend="cdist")
    assert got.isnan().any() and got.isinf().any()
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), ref.isinf())
    finite = ref.isfinite()
    torch.testing.assert_close(got[finite], ref[finite], rtol=1e-5, atol=1e-5)


# ---- head_l1_cost and the matches ------------------------------------------------------------------------------------
def _head_inputs(g: int | None, ns: int = 7, nt: int = 11, v: int = 101, ds: int = 16, dt: int = 12):
    lead = () if g is None else (g,)
    return (_rows((*lead, ns, ds), 10, 1.0), _rows((v, ds), 11, 0.3), _rows((v,), 12, 0.1),
            _rows((*lead, nt, dt), 13, 1.0), _rows((v, dt), 14, 0.3), _rows((v,), 15, 0.1))


@pytest.mark.parametrize("g", [None, 1, 3])
@pytest.mark.parametrize("chunk_size", [10, 1024])
def test_triton_head_l1_cost_equals_cdist(interpreter, g, chunk_size):
    inputs = _head_inputs(g)
    got = head_l1_cost(*inputs, chunk_size=chunk_size, backend="triton")
    ref = head_l1_cost(*inputs, chunk_size=chunk_size, backend="cdist")
    assert got.shape == ref.shape == (*(() if g is None else (g,)), 7, 11)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_triton_and_cdist_give_the_same_hungarian_matches(interpreter, seed):
    """Related inputs, as EM-KD's matching sees them: 12 student tokens that are 4-token averages of 48 teacher tokens
    plus noise, and a student head that is the teacher's plus 10 % noise; 512-entry vocabulary in 4 chunks."""
    gen = torch.Generator().manual_seed(seed)
    ht = torch.randn(2, 48, 16, generator=gen) * 2.0  # (G, Nt, D)
    hs = ht.view(2, 12, 4, 16).mean(2) + 0.5 * torch.randn(2, 12, 16, generator=gen)  # (G, Ns, D)
    wt = torch.randn(512, 16, generator=gen) * 0.25  # (V, D)
    ws = wt + 0.025 * torch.randn(512, 16, generator=gen)
    got = head_l1_cost(hs, ws, None, ht, wt, None, chunk_size=128, backend="triton")
    ref = head_l1_cost(hs, ws, None, ht, wt, None, chunk_size=128, backend="cdist")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for g in range(2):
        rows_got, cols_got = linear_sum_assignment(got[g].numpy())
        rows_ref, cols_ref = linear_sum_assignment(ref[g].numpy())
        assert rows_got.tolist() == rows_ref.tolist() and cols_got.tolist() == cols_ref.tolist()


# ---- backend selection ----------------------------------------------------------------------------------------------
def _on(device: str) -> types.SimpleNamespace:
    """A stand-in for a tensor on ``device``: ``resolve_backend`` reads only ``.device``, and this machine may have no
    GPU."""
    return types.SimpleNamespace(device=torch.device(device))


def test_triton_is_a_backend_and_imports_here():
    assert "triton" in l1_kernels.BACKENDS
    assert l1_kernels.triton_available()


def test_auto_never_picks_triton_on_cpu(interpreter_variable):
    """Not even with the interpreter on: it is a test tool, far slower than cdist."""
    assert l1_kernels.resolve_backend("auto", torch.zeros(1)) in ("numba", "cdist")
    assert l1_kernels.resolve_backend("auto", torch.zeros(1), _on("cuda")) == "cdist"  # mixed devices


def test_auto_keeps_cdist_on_cuda_until_the_kernel_is_timed_on_a_gpu():
    assert l1_kernels.triton_available()
    assert l1_kernels.resolve_backend("auto", _on("cuda:0"), _on("cuda:0")) == "cdist"
    assert l1_kernels.resolve_backend("triton", _on("cuda:0"), _on("cuda:0")) == "triton"


def test_auto_takes_cdist_on_cuda_without_triton(without_triton):
    assert not l1_kernels.triton_available()
    assert l1_kernels.resolve_backend("auto", _on("cuda"), _on("cuda")) == "cdist"


def test_triton_backend_refuses_cpu_tensors_without_the_interpreter(compiled):
    a, b = torch.zeros(3, 4), torch.zeros(5, 4)
    message = r"backend='triton' runs on CUDA tensors only \(or on any device with TRITON_INTERPRET=1.*\['cpu'\]"
    with pytest.raises(ValueError, match=message):
        l1_cost(a, b, backend="triton")
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA tensors only"):
        head_l1_cost(*_head_inputs(None), backend="triton")
    with pytest.raises(ValueError, match=r"Triton needs CUDA tensors \(or TRITON_INTERPRET=1\), got cpu"):
        l1_kernels.l1_accumulate(a, b, torch.zeros(3, 5), "triton")
    assert l1_kernels.resolve_backend("triton", _on("cuda"), _on("cuda")) == "triton"


def test_triton_backend_accepts_cpu_tensors_with_the_interpreter(interpreter_variable):
    assert l1_kernels.resolve_backend("triton", torch.zeros(3, 4), torch.zeros(5, 4)) == "triton"


def test_triton_backend_without_triton_says_how_to_install_it(without_triton):
    a, b = torch.zeros(3, 4), torch.zeros(5, 4)
    with pytest.raises(ImportError, match=r"backend='triton' needs triton.*No module named 'triton'.*emkd\[gpu\]"):
        l1_cost(a, b, backend="triton")
    with pytest.raises(ImportError, match=r"emkd\[gpu\]"):
        l1_kernels.l1_accumulate(a, b, torch.zeros(3, 5), "triton")


@pytest.mark.skipif(LANGUAGE_INTERPRETED, reason="needs triton imported without TRITON_INTERPRET=1")
def test_setting_the_interpreter_after_importing_triton_is_refused_clearly(interpreter_variable):
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 is set now but was not set when triton was imported"):
        l1_cost(torch.zeros(3, 4), torch.zeros(5, 4), backend="triton")


@pytest.mark.skipif(LANGUAGE_INTERPRETED, reason="this process runs the kernel checks itself")
def test_kernel_checks_in_a_fresh_interpreter_process(request):
    """Runs the tests taking the ``interpreter`` fixture that ``tests/conftest.py`` deselected from this session (all
    of them, if it holds none) in a new ``pytest`` process with ``TRITON_INTERPRET=1`` set from the start, and
    requires every one to pass."""
    from conftest import TRITON_INTERPRETER_ITEMS

    this_file = Path(__file__).resolve()
    selected = request.config.stash.get(TRITON_INTERPRETER_ITEMS, [])
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(selected or [str(this_file)])]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(command, cwd=request.config.rootpath, env=env, capture_output=True, text=True, timeout=600)
    report = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0, report
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed is not None, report
    if selected:
        assert int(passed.group(1)) == len(selected), report


@pytest.mark.skipif(LANGUAGE_INTERPRETED, reason="needs triton imported without TRITON_INTERPRET=1")
@pytest.mark.parametrize("capability", [80, 90])
def test_kernel_compiles_for_cuda_without_a_gpu(compiled, monkeypatch, tmp_path, capability):
    """Triton's compiler, which the interpreter skips: the kernel lowers to PTX and, with the ``ptxas`` that triton
    ships, to a cubin for Ampere (sm_80) and Hopper (sm_90); no device is needed to compile."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernel = _l1_triton._kernel(False)
    blocks = {"BLOCK_S": _l1_triton.BLOCK_S, "BLOCK_T": _l1_triton.BLOCK_T, "BLOCK_F": _l1_triton.BLOCK_F}
    signature = {name: "*fp32" if name.endswith("_ptr") else "constexpr" if name in blocks else "i32"
                 for name in kernel.arg_names}  # pointers, sizes and strides, block sizes
    compiled_kernel = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=blocks),
                                     target=GPUTarget("cuda", capability, 32),
                                     options={"num_warps": _l1_triton.NUM_WARPS})
    assert "abs.f32" in compiled_kernel.asm["ptx"] and len(compiled_kernel.asm["cubin"]) > 0


# ---- on a GPU -------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(LANGUAGE_INTERPRETED, reason="triton was imported for the interpreter in this process")
def test_triton_on_cuda_equals_cdist(compiled):
    a, b = _rows((2, 144, 1000), 30).cuda(), _rows((2, 729, 1000), 31).cuda()
    assert l1_kernels.resolve_backend("triton", a, b) == "triton"
    out = torch.zeros(2, 144, 729, device="cuda")
    l1_kernels.l1_accumulate(a, b, out, "triton")
    torch.testing.assert_close(out, torch.cdist(a, b, p=1.0), rtol=1e-5, atol=1e-3)
