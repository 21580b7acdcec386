"""IEEE-rounded float32 arithmetic for the Triton kernels: each operation rounds once, as on the CPU.

Why not plain operators: Triton lowers fp32 ``/`` to an approximate division, and ptxas contracts a ``mul``
followed by an ``add`` into one FMA (one rounding instead of two). libdevice's ``*_rn`` functions would fix
both, but Triton links libdevice with flush-to-zero on, which breaks the subnormal scale 1e-38 the reference
stores for an all-zero tail block. Explicit PTX (``div.rn.f32``, ``mul.rn.f32``, ``add.rn.f32``,
``fma.rn.f32``, no ``.ftz``) rounds once, keeps subnormals and is never contracted.

Triton's CPU interpreter (``TRITON_INTERPRET=1``) cannot run inline PTX, so there the helpers use numpy's
float32 operators, which are IEEE and never fused; ``fma_rn`` is emulated in float64 (exact product, one
extra rounding of the sum), and ``round_to`` rounds to bfloat16 with integer arithmetic because
the interpreter's own float32 -> bfloat16 cast truncates. The PTX versions are only exercised on a GPU.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton itself decides at decoration time whether @triton.jit interprets, from the same variable.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if INTERPRET:

    @triton.jit
    def div_rn(a, b):
        """a / b, IEEE round-to-nearest-even."""
        return a / b

    @triton.jit
    def mul_rn(a, b):
        """a * b, rounded once (never fused with a following add)."""
        return a * b

    @triton.jit
    def add_rn(a, b):
        """a + b, rounded once (never fused with a preceding multiply)."""
        return a + b

    @triton.jit
    def fma_rn(a, b, c):
        """a * b + c in float64: the product is exact, the sum rounds twice (float64, then float32), which
        can differ from one rounding in rare near-ties; the 8-bit bin index (an integer part) is unaffected,
        see :func:`kbit.quant.blockwise8.lut_bins`."""
        return (a.to(tl.float64) * b + c).to(tl.float32)

    @triton.jit
    def round_to(v, dtype: tl.constexpr):
        """float32 ``v`` rounded to nearest-even in ``dtype`` (the interpreter's own bf16 cast truncates)."""
        if dtype == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)  # finite values only: round the 16 dropped bits to even
            return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return v.to(dtype)

else:

    @triton.jit
    def div_rn(a, b):
        """a / b, IEEE round-to-nearest-even, subnormals kept."""
        return tl.inline_asm_elementwise(
            "div.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )

    @triton.jit
    def mul_rn(a, b):
        """a * b, rounded once (never fused with a following add), subnormals kept."""
        return tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )

    @triton.jit
    def add_rn(a, b):
        """a + b, rounded once (never fused with a preceding multiply), subnormals kept."""
        return tl.inline_asm_elementwise(
            "add.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )

    @triton.jit
    def fma_rn(a, b, c):
        """a * b + c with a single rounding, subnormals kept."""
        return tl.inline_asm_elementwise(
            "fma.rn.f32 $0, $1, $2, $3;", "=f,f,f,f", [a, b, c], dtype=tl.float32, is_pure=True, pack=1
        )

    @triton.jit
    def round_to(v, dtype: tl.constexpr):
        """float32 ``v`` rounded to nearest-even in ``dtype`` (cvt.rn)."""
        return v.to(dtype)


@triton.jit
def abs_max_rows(x):
    """max |x| along axis 1 of a float32 [R, C] tile, on the bit patterns (exact, no flush of subnormals)."""
    # For non-negative IEEE floats the integer order of the bits is the numeric order: an exact float max.
    bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.max(bits, axis=1).to(tl.float32, bitcast=True)
