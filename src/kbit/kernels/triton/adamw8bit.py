"""Multi-tensor AdamW in one Triton launch: 8-bit blockwise states (bitsandbytes' op order) or plain moments.

Every parameter of a launch owns a segment of flat state buffers that starts on a 256-element block
(:mod:`kbit.optim.flat`). A program updates one tile (R consecutive blocks of one parameter): it reads the
parameter's address, gradient address, size and first global block from a per-parameter table, so hundreds of
tensors cost one launch instead of one each.

Per element, in float32, with each operation rounded once (the :mod:`.rounding` helpers stop ptxas from
contracting or approximating anything), mirroring the torch CPU ops of bitsandbytes' CPU ``AdamW8bit`` as
torch's AVX2/AVX-512 kernels evaluate them (``add(alpha=)`` and ``addcmul`` are one fused multiply-add
there)::

    m = code1[q1] * absmax1                 v = code2[q2] * absmax2          (8-bit: dequantize)
    m = fma(g, 1 - b1, m * b1)              (plain moments: m = fma(1 - b1, g - m, m), torch's lerp)
    v = fma((1 - b2) * g, g, v * b2)
    denom = sqrt(v) / c2 + eps              c2 = sqrt(1 - b2^t)
    p = p * (1 - lr wd);  p = p + ((-lr / c1) * m) / denom            c1 = 1 - b1^t
    q1, absmax1 = quantize(m);  q2, absmax2 = quantize(v)            (8-bit: :mod:`kbit.quant.blockwise8`)

Where the result can differ from the CPU reference (bitsandbytes' CPU code run by torch's CPU kernels):

* ``sqrt``: here IEEE (``sqrt.rn``); torch's vectorised CPU sqrt is not correctly rounded (about 16% of
  results one ulp off, measured on AVX2). ``denom``, and so the update, can differ by an ulp: the parameter
  moves by up to one ulp of the update per step. The moments never depend on it, so the 8-bit states stay
  identical.
* FMA: torch's AVX2/AVX-512 kernels fuse ``add(alpha=)`` and ``addcmul`` as above; a build without FMA rounds
  twice there, which would move a moment by an ulp, its block's absmax by an ulp, and single codes by one
  step.
* Triton's interpreter (CPU tests) emulates the FMA in float64, which can round twice in about one case in
  2^29.

Tests hold the GPU and the interpreter to the reference within those bounds."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rounding import INTERPRET, abs_max_rows, add_rn, div_rn, fma_rn, mul_rn, round_to

BLOCK = 256  # elements per quantization block (bitsandbytes' optimizer blocksize)
TILE_BLOCKS = 4  # blocks per program: 1,024 elements, 8 per thread with 4 warps
WARPS = 4
N_SCALARS = 8  # columns of the scalar table (kbit.optim.flat.scalar_row)
N_PARAM_COLS = 5  # columns of the parameter table, see kbit.optim.flat.ParamTable

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

if INTERPRET:

    @triton.jit
    def sqrt_rn(x):
        """Correctly rounded square root (numpy's float32 sqrt is IEEE)."""
        return tl.sqrt(x)

else:

    @triton.jit
    def sqrt_rn(x):
        """Correctly rounded square root, subnormals kept (tl.sqrt may approximate)."""
        return tl.inline_asm_elementwise("sqrt.rn.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _requantize(x, lut_ptr, R: tl.constexpr, BS: tl.constexpr):
    """Blockwise dynamic 8-bit codes of a float32 [R, BS] tile (one block a row): (uint8 codes, absmax
    [R])."""
    am = abs_max_rows(x)
    zero = am == 0.0
    one = tl.full([R], 1.0, tl.float32)
    inv = tl.where(zero, 0.0, div_rn(one, tl.where(zero, one, am)))  # IEEE reciprocal, as the reference
    s = mul_rn(x, tl.broadcast_to(inv[:, None], (R, BS)))
    s = tl.minimum(tl.maximum(s, -1.0), 1.0)
    h = mul_rn(add_rn(s, tl.full([R, BS], 1.0, tl.float32)), tl.full([R, BS], 0.5, tl.float32))
    bins = fma_rn(h, tl.full([R, BS], 65535.0, tl.float32), tl.full([R, BS], 0.5, tl.float32)).to(tl.int32)
    bins = tl.minimum(tl.maximum(bins, 0), 65535)  # a NaN moment must not index outside the table
    q = tl.load(lut_ptr + bins)
    return tl.where(zero[:, None], 0, q).to(tl.uint8), am


@triton.jit(do_not_specialize=["tile0", "blk_base"])  # one compilation for every chunk of a paged step
def _adamw_tiles_kernel(
    tiles_ptr,  # int32 [ntiles, 2]: (parameter index, first block of the tile inside the parameter)
    # int64 [nparams, 5]: (param address, grad address or 0 to skip, numel, first global block, scalar row)
    params_ptr,
    scalars_ptr,  # float32 [rows, 8]: b1, 1 - b1, b2, 1 - b2, c2, eps, 1 - lr wd, -lr / c1
    s1_ptr,  # 8-bit: uint8 codes of m; else m in its own dtype. Indexed by (global block - blk_base) * BS
    s2_ptr,
    a1_ptr,  # 8-bit: float32 absmax of m per block (unused otherwise)
    a2_ptr,
    code1_ptr,  # float32 [256] signed dynamic map (8-bit only)
    code2_ptr,  # float32 [256] unsigned dynamic map
    lut1_ptr,  # uint8 [65536] bin -> code of the signed map
    lut2_ptr,
    tile0,
    blk_base,
    P_DTYPE: tl.constexpr,
    STATE8: tl.constexpr,
    R: tl.constexpr,
    BS: tl.constexpr,
):
    t = tile0 + tl.program_id(0)
    i = tl.load(tiles_ptr + 2 * t).to(tl.int64)
    b = tl.load(tiles_ptr + 2 * t + 1).to(tl.int64)
    row = params_ptr + 5 * i
    g_addr = tl.load(row + 1)
    if g_addr != 0:
        p_ptr = tl.load(row).to(tl.pointer_type(P_DTYPE))
        g_ptr = g_addr.to(tl.pointer_type(P_DTYPE))
        n = tl.load(row + 2)
        first = tl.load(row + 3) - blk_base
        sc = scalars_ptr + 8 * tl.load(row + 4)  # N_SCALARS columns
        b1 = tl.load(sc)
        w1 = tl.load(sc + 1)
        b2 = tl.load(sc + 2)
        w2 = tl.load(sc + 3)
        c2 = tl.load(sc + 4)
        eps = tl.load(sc + 5)
        decay = tl.load(sc + 6)
        step_neg = tl.load(sc + 7)

        blk = b + tl.arange(0, R)  # [R] blocks of this parameter
        cols = tl.arange(0, BS)
        offs = blk[:, None] * BS + cols[None, :]  # [R, BS] element offsets inside the parameter
        mask = offs < n
        rmask = blk * BS < n
        sblk = first + blk  # [R] block index inside the state buffers
        soffs = sblk[:, None] * BS + cols[None, :]

        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if STATE8:
            am1 = tl.load(a1_ptr + sblk, mask=rmask, other=0.0)
            am2 = tl.load(a2_ptr + sblk, mask=rmask, other=0.0)
            q1 = tl.load(s1_ptr + soffs, mask=mask, other=0).to(tl.int32)
            q2 = tl.load(s2_ptr + soffs, mask=mask, other=0).to(tl.int32)
            m = mul_rn(tl.load(code1_ptr + q1), tl.broadcast_to(am1[:, None], (R, BS)))
            v = mul_rn(tl.load(code2_ptr + q2), tl.broadcast_to(am2[:, None], (R, BS)))
            m = fma_rn(g, tl.broadcast_to(w1, (R, BS)), mul_rn(m, tl.broadcast_to(b1, (R, BS))))
        else:
            m = tl.load(s1_ptr + soffs, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(s2_ptr + soffs, mask=mask, other=0.0).to(tl.float32)
            # torch's lerp(m, g, w): fma(w, g - m, m) for w < 0.5, else fma(w - 1, g - m, g)
            d = add_rn(g, -m)
            small = w1 < 0.5
            m = fma_rn(
                tl.broadcast_to(tl.where(small, w1, w1 - 1.0), (R, BS)),  # a lone subtraction: exact
                d,
                tl.where(small, m, g),
            )
        v = fma_rn(mul_rn(g, tl.broadcast_to(w2, (R, BS))), g, mul_rn(v, tl.broadcast_to(b2, (R, BS))))
        denom = add_rn(div_rn(sqrt_rn(v), tl.broadcast_to(c2, (R, BS))), tl.broadcast_to(eps, (R, BS)))
        p = mul_rn(p, tl.broadcast_to(decay, (R, BS)))
        p = add_rn(div_rn(mul_rn(tl.broadcast_to(step_neg, (R, BS)), m), denom), p)
        tl.store(p_ptr + offs, round_to(p, P_DTYPE), mask=mask)

        m = tl.where(mask, m, 0.0)  # padding must not raise a block's absmax
        v = tl.where(mask, v, 0.0)
        if STATE8:
            q1n, am1n = _requantize(m, lut1_ptr, R, BS)
            q2n, am2n = _requantize(v, lut2_ptr, R, BS)
            tl.store(s1_ptr + soffs, q1n, mask=mask)
            tl.store(s2_ptr + soffs, q2n, mask=mask)
            tl.store(a1_ptr + sblk, am1n, mask=rmask)
            tl.store(a2_ptr + sblk, am2n, mask=rmask)
        else:
            tl.store(s1_ptr + soffs, round_to(m, s1_ptr.dtype.element_ty), mask=mask)
            tl.store(s2_ptr + soffs, round_to(v, s2_ptr.dtype.element_ty), mask=mask)


def adamw_tiles(
    tiles: torch.Tensor,
    params: torch.Tensor,
    scalars: torch.Tensor,
    states: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
    p_dtype: torch.dtype,
    tile0: int = 0,
    ntiles: int | None = None,
    blk_base: int = 0,
) -> None:
    """Run AdamW on tiles ``[tile0, tile0 + ntiles)``; ``tables`` = (code1, code2, lut1, lut2) selects 8-bit
    states.

    ``states`` = (s1, s2, absmax1, absmax2) flat buffers whose block 0 is global block ``blk_base``.
    """
    ntiles = tiles.shape[0] - tile0 if ntiles is None else ntiles
    if ntiles <= 0:
        return
    s1, s2, a1, a2 = states
    state8 = tables is not None
    code1, code2, lut1, lut2 = tables if state8 else (s1, s1, s1, s1)  # placeholders, never read
    _adamw_tiles_kernel[(ntiles,)](
        tiles,
        params,
        scalars,
        s1,
        s2,
        a1 if state8 else s1,
        a2 if state8 else s1,
        code1,
        code2,
        lut1,
        lut2,
        tile0,
        blk_base,
        P_DTYPE=_TL_DTYPES[p_dtype],
        STATE8=state8,
        R=TILE_BLOCKS,
        BS=BLOCK,
        num_warps=WARPS,
    )
