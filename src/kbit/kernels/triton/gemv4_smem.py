"""Gluon kernel for decoding: the 4-bit GEMV of gemv4.py (same arguments, epilogue and rounding) with its code
lookups served from a table in shared memory, for Hopper and newer.

Why: the register lookups (gemv4's LUT mode, PRMT) cost ~4 integer-pipe instructions per code, and Triton's layouts
added barriers to every iteration; both capped it at 36% of copy bandwidth. Here a byte of codes costs one PRMT and
one IMAD (its table address) and one 8-byte shared load of both float32 codes; Gluon's explicit layouts keep every
reduction inside a thread until a row group ends. The table is replicated so that a shared load never conflicts.
Launched as a programmatic dependent: weights, scales and the table are read before ``griddepcontrol.wait``, x and
the output after it, so the launch and first loads overlap the previous kernel. bench/RESULTS.md, "Session 7".
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from ...quant.state import QuantState

# A CTA-wide barrier: ``thread_barrier`` in Triton 3.6's Gluon, ``barrier`` in later ones.
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

# Byte j of a word of codes to its table entry's address (PRMT moves the byte to the bottom, zeroing the rest; the
# multiply-add runs on the FMA pipe), then both float32 codes in one 8-byte shared load.
_LOOKUP = gl.constexpr("""{
.reg .b32 t;
prmt.b32 t, $2, 0, $3;
mad.lo.u32 t, t, 128, $4;
ld.shared.v2.b32 {$0, $1}, [t];
}""")


@gluon.jit
def _quarters(t, layout: gl.constexpr):
    """The four slices along the last axis (size 4, held by one thread) of a 3-D or 4-D ``t``, in ``layout``."""
    if len(t.shape) == 4:
        a, b = gl.split(gl.reshape(t, [t.shape[0], t.shape[1], t.shape[2], 2, 2]))  # (0, 2) and (1, 3)
    else:
        a, b = gl.split(gl.reshape(t, [t.shape[0], t.shape[1], 2, 2]))
    t0, t2 = gl.split(a)
    t1, t3 = gl.split(b)
    return (gl.convert_layout(t0, layout), gl.convert_layout(t1, layout), gl.convert_layout(t2, layout),
            gl.convert_layout(t3, layout))  # fmt: skip


@gluon.jit
def _mul_rn(a, b):
    return gl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=gl.float32, is_pure=True,
                                     pack=1)  # fmt: skip


@gluon.jit
def _add_rn(a, b):
    return gl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=gl.float32, is_pure=True,
                                     pack=1)  # fmt: skip


@gluon.jit
def _load_w(w_ptr, absmax_ptr, nested_ptr, rows, rmask, k0, K, KW, KB, woff, cq, BS: gl.constexpr,
            NESTED: gl.constexpr, NESTED_BS: gl.constexpr):  # fmt: skip
    """Packed words [R, CH, 4] and the raw scales [R, CH] of columns k0 .. k0 + 32 CH: under double quantization
    the 8-bit code and the nested scale (decoded by :func:`_scales` a step later, so that no load here waits on
    another)."""
    kw0 = k0 // 8
    m2 = gl.expand_dims(rmask, 1) & gl.expand_dims((k0 + cq * 32) < K, 0)
    q = gl.load(w_ptr + gl.expand_dims(gl.expand_dims(rows.to(gl.int64) * KW + kw0, 1), 2) + woff,
                mask=gl.expand_dims(m2, 2), other=0)  # fmt: skip
    ab = gl.expand_dims(rows * KB, 1) + gl.expand_dims((k0 + cq * 32) // BS, 0)
    if NESTED:
        q8 = gl.load(absmax_ptr + ab, mask=m2, other=0)
        nested = gl.load(nested_ptr + ab // NESTED_BS, mask=m2, other=0.0)
    else:
        q8 = gl.load(absmax_ptr + ab, mask=m2, other=0.0)
        nested = q8
    return q, q8, nested


@gluon.jit
def _scales(q8, nested, code8_ptr, offset, NESTED: gl.constexpr):
    """Float32 chunk scales [R, CH], rebuilt from double quantization as the dequantizer rounds them."""
    if NESTED:
        am = _add_rn(_mul_rn(gl.load(code8_ptr + q8.to(gl.int32)), nested), offset)
    else:
        am = q8
    return am


@gluon.jit
def _load_step_w(w_ptr, absmax_ptr, nested_ptr, t, total, pid, nprog, KSTEPS, R: gl.constexpr, rows0, N, K, KW, KB,
                 woff, cq, CH: gl.constexpr, BS: gl.constexpr, NESTED: gl.constexpr,
                 NESTED_BS: gl.constexpr):  # fmt: skip
    """:func:`_load_w` for this program's step t (group pid + (t // KSTEPS) * nprog, K step t % KSTEPS); nothing
    past its last step."""
    rows = (pid + (t // KSTEPS) * nprog) * R + rows0
    return _load_w(w_ptr, absmax_ptr, nested_ptr, rows, (rows < N) & (t < total), (t % KSTEPS) * (CH * 32), K, KW, KB,
                   woff, cq, BS, NESTED, NESTED_BS)  # fmt: skip


@gluon.jit
def _load_x(x_ptr, k0, K, xoff, xmask, cx4):
    """x words [XR, CH, 4, 4] of columns k0 .. k0 + 32 CH of every row."""
    return gl.load(x_ptr + (k0 // 8) * 4 + xoff, mask=xmask & ((k0 + cx4 * 32) < K), other=0)


@gluon.jit
def _epilogue(y, n, nmask, xr, xrmask, N, bias_ptr, xa_ptr, lb_ptr, res_ptr, out_ptr, R, XS, XA_STRIDE, lora_scale,
              LS3: gl.constexpr, RP: gl.constexpr, XSP: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_LORA: gl.constexpr,
              HAS_RES: gl.constexpr):  # fmt: skip
    """Float32 sums ``y`` [XR, rows n] + bias + LoRA, rounded, + residual, stored: as gemv4's epilogue rounds."""
    dt: gl.constexpr = out_ptr.dtype.element_ty
    n2 = gl.expand_dims(n, 0)
    m2 = gl.expand_dims(xrmask, 1) & gl.expand_dims(nmask, 0)
    if HAS_BIAS:
        y += gl.expand_dims(gl.load(bias_ptr + n, mask=nmask, other=0.0).to(gl.float32), 0)
    if HAS_LORA:
        # x A^T of row xr: the XS float32 partial sums at rows xr * XS .. (one row: lora_down's form), summed
        r = gl.arange(0, RP, layout=gl.SliceLayout(0, gl.SliceLayout(1, LS3)))
        sp = gl.arange(0, XSP, layout=gl.SliceLayout(0, gl.SliceLayout(2, LS3)))
        xr3 = gl.expand_dims(gl.expand_dims(xr, 1), 2)
        sp3 = gl.expand_dims(gl.expand_dims(sp, 0), 2)
        r3 = gl.expand_dims(gl.expand_dims(r, 0), 1)
        xa = gl.load(
            xa_ptr + (xr3 * XS + sp3) * XA_STRIDE + r3,
            mask=gl.expand_dims(gl.expand_dims(xrmask, 1), 2) & (sp3 < XS) & (r3 < R),
            other=0.0,
        )
        xa = gl.sum(xa.to(gl.float32), axis=1).to(dt).to(gl.float32)  # [XR, RP], as F.linear(x, A) would round it
        rb = gl.arange(0, RP, layout=gl.SliceLayout(0, gl.SliceLayout(0, LS3)))
        nb = gl.convert_layout(n, gl.SliceLayout(1, gl.SliceLayout(0, LS3)))
        lb = gl.load(
            lb_ptr + gl.expand_dims(nb, 1) * R + gl.expand_dims(rb, 0),
            mask=gl.expand_dims(nb < N, 1) & gl.expand_dims(rb < R, 0),
            other=0.0,
        )  # [rows, RP]
        y += lora_scale * gl.sum(gl.expand_dims(xa, 1) * gl.expand_dims(lb.to(gl.float32), 0), axis=2)
    if HAS_RES:  # round, then add as a separate op would
        res = gl.load(res_ptr + gl.expand_dims(xr, 1) * N + n2, mask=m2, other=0.0)
        y = y.to(dt).to(gl.float32) + res.to(gl.float32)
    gl.store(out_ptr + gl.expand_dims(xr, 1) * N + n2, y.to(dt), mask=m2)


@gluon.jit
def _gemv4_smem_kernel(
    x_ptr, w_ptr, absmax_ptr, table_ptr, nested_ptr, code8_ptr, offset_ptr, bias_ptr, xa_ptr, lb_ptr, res_ptr, out_ptr,
    M, N, K, KW, KB, NGROUPS, R_LORA, XS, XA_STRIDE, lora_scale, BS: gl.constexpr, NESTED: gl.constexpr,
    NESTED_BS: gl.constexpr, RT: gl.constexpr, REP: gl.constexpr, NUM_WARPS: gl.constexpr, PDL: gl.constexpr,
    XR: gl.constexpr,
    RP: gl.constexpr, XSP: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_LORA: gl.constexpr, HAS_RES: gl.constexpr,
):  # fmt: skip
    # [x rows, weight rows, 32-code chunks, words of a chunk, bytes of a word]: a thread holds RT weight rows x REP
    # chunks of 16 bytes and every x row; the lanes of a warp read consecutive chunks of a weight row (coalesced) and
    # their x words (16 each, consecutive).
    L5: gl.constexpr = gl.BlockedLayout([XR, RT, 1, 4, 4], [1, 1, 32, 1, 1], [1, NUM_WARPS, 1, 1, 1], [4, 3, 2, 1, 0])
    LQ: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(4, L5))  # [R, CH, 4] packed words
    LX: gl.constexpr = gl.SliceLayout(1, L5)  # [XR, CH, 4, 4] x words
    LS3: gl.constexpr = gl.SliceLayout(3, gl.SliceLayout(4, L5))  # [XR, R, CH] chunk sums
    LS: gl.constexpr = gl.SliceLayout(2, LQ)  # [R, CH] chunk scales, lookups
    LSA: gl.constexpr = gl.SliceLayout(0, LS3)  # the same, to broadcast over x rows
    R: gl.constexpr = RT * NUM_WARPS
    CH: gl.constexpr = 32 * REP
    TL: gl.constexpr = gl.BlockedLayout([4], [32], [NUM_WARPS], [0])

    rows0 = gl.arange(0, R, layout=gl.SliceLayout(1, LS))
    cq = gl.arange(0, CH, layout=gl.SliceLayout(0, LS))
    wq = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, LQ)))
    xr = gl.arange(0, XR, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, LX))))
    cx = gl.arange(0, CH, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, LX))))
    wx = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, LX))))
    jx = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, LX))))
    xr4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(xr, 1), 2), 3)  # [XR, 1, 1, 1]
    cx4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(cx, 0), 2), 3)  # [1, CH, 1, 1]
    xoff = (xr4 * (K // 2) + cx4 * 16 + gl.expand_dims(gl.expand_dims(gl.expand_dims(wx, 0), 1), 3) * 4
            + gl.expand_dims(gl.expand_dims(gl.expand_dims(jx, 0), 1), 2))  # fmt: skip
    xmask = xr4 < M
    xr_s = gl.arange(0, XR, layout=gl.SliceLayout(1, gl.SliceLayout(2, LS3)))  # x rows of the sums [XR, R]
    n_s = gl.arange(0, R, layout=gl.SliceLayout(0, gl.SliceLayout(2, LS3)))
    woff = gl.expand_dims(gl.expand_dims(cq, 0), 2) * 4 + gl.expand_dims(gl.expand_dims(wq, 0), 1)  # [1, CH, 4]
    offset = gl.load(offset_ptr) if NESTED else 0.0
    KSTEPS = gl.cdiv(K, CH * 32)
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    total = gl.cdiv(NGROUPS - pid, nprog) * KSTEPS  # (group, step) pairs of this program

    if PDL:  # the next kernel may start its own prologue as soon as SMs free up
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                                  pack=1)  # fmt: skip
    # The first steps' weight loads go out before the table is written and before waiting for the previous kernel:
    # they overlap its copy, the barrier and the previous kernel's tail.
    q, q8, nested = _load_step_w(w_ptr, absmax_ptr, nested_ptr, 0, total, pid, nprog, KSTEPS, R, rows0, N, K, KW, KB,
                                 woff, cq, CH, BS, NESTED, NESTED_BS)  # fmt: skip

    # The table (smem_table): 256 entries of 128 bytes, a copy per lane of a half warp, so that no two lanes of one
    # 8-byte shared load hit a bank at different addresses.
    tbl = gl.allocate_shared_memory(gl.int32, [8192], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    tbl.store(gl.load(table_ptr + gl.arange(0, 8192, layout=TL)))
    _cta_barrier()
    if PDL:  # x (and the output) belong to the previous kernel until it has finished
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
    xw = _load_x(x_ptr, 0, K, xoff, xmask, cx4)
    base = gl.inline_asm_elementwise("mov.u32 $0, global_smem;", "=r,r", [cq], dtype=gl.int32, is_pure=True,
                                     pack=1)  # fmt: skip
    base2 = gl.expand_dims(base + (cq % 16) * 8, 0)  # [1, CH]: this lane's copy

    acc = gl.zeros([XR, R, CH], gl.float32, LS3)
    for t in range(total):
        # Issue the loads of step t + 1 (the next group's first after a group's last) before this one is summed (two
        # steps ahead measured slower: the loop is bound by issuing instructions, not by bytes in flight).
        nq, nq8, nnested = _load_step_w(w_ptr, absmax_ptr, nested_ptr, t + 1, total, pid, nprog, KSTEPS, R, rows0,
                                        N, K, KW, KB, woff, cq, CH, BS, NESTED, NESTED_BS)  # fmt: skip
        nxw = _load_x(x_ptr, ((t + 1) % KSTEPS) * (CH * 32), K, xoff, xmask, cx4)
        # The four words of each chunk and the four x words of each of their bytes, split in registers (free), so
        # that a (row, chunk) sums its 32 products in one FMA chain and one multiply by its scale.
        q0, q1, q2, q3 = _quarters(q, LS)
        xb0, xb1, xb2, xb3 = _quarters(xw, gl.SliceLayout(3, LX))  # byte j: x words [XR, CH, 4 words]
        part = gl.zeros([XR, R, CH], gl.float32, LS3)
        for w in gl.static_range(4):
            qw = q0 if w == 0 else (q1 if w == 1 else (q2 if w == 2 else q3))
            for j in gl.static_range(4):
                xj = xb0 if j == 0 else (xb1 if j == 1 else (xb2 if j == 2 else xb3))
                xs = _quarters(xj, gl.SliceLayout(1, LS3))
                xwj = gl.expand_dims(xs[0] if w == 0 else (xs[1] if w == 1 else (xs[2] if w == 2 else xs[3])), 1)
                ve, vo = gl.inline_asm_elementwise(_LOOKUP, "=r,=r,r,r,r", [qw, 0x4440 + j, base2],
                                                   dtype=(gl.int32, gl.int32), is_pure=True, pack=1)  # fmt: skip
                ve = gl.expand_dims(gl.convert_layout(ve.to(gl.float32, bitcast=True), LSA), 0)
                vo = gl.expand_dims(gl.convert_layout(vo.to(gl.float32, bitcast=True), LSA), 0)
                part = ve * (xwj << 16).to(gl.float32, bitcast=True) + part
                part = vo * (xwj & -65536).to(gl.float32, bitcast=True) + part
        acc += gl.expand_dims(gl.convert_layout(_scales(q8, nested, code8_ptr, offset, NESTED), LSA), 0) * part
        if t % KSTEPS == KSTEPS - 1:
            orow = (pid + (t // KSTEPS) * nprog) * R + n_s
            _epilogue(gl.sum(acc, axis=2), orow, orow < N, xr_s, xr_s < M, N, bias_ptr, xa_ptr, lb_ptr, res_ptr,
                      out_ptr, R_LORA, XS, XA_STRIDE, lora_scale, LS3, RP, XSP, HAS_BIAS, HAS_LORA,
                      HAS_RES)  # fmt: skip
            acc = gl.zeros([XR, R, CH], gl.float32, LS3)
        q, xw, q8, nested = nq, nxw, nq8, nnested


MAX_ROWS = 4  # x rows per launch: every thread keeps each row's sums (8 spill registers)


def smem_table(code: torch.Tensor, build: bool = True) -> torch.Tensor | None:
    """The kernel's shared-memory table for a 16-entry code table, built on its device and cached (a CUDA graph
    capture must not build it): [256 bytes, 16 copies, 2] float32 as 8192 int32 words, entry (b, c) holding
    (code[b >> 4], code[b & 15])."""
    table = getattr(code, "_kbit_smem_table", None)  # kept on the code tensor: lives and dies with the quant state
    if table is None and build:
        c = code.to(torch.float32)
        b = torch.arange(256, device=code.device)
        pair = torch.stack([c[b >> 4], c[b & 15]], dim=1)  # [256, 2]
        table = pair[:, None, :].expand(256, 16, 2).contiguous().reshape(-1).view(torch.int32)
        code._kbit_smem_table = table
    return table


def config_for(n: int, k: int, m: int = 1) -> tuple[int, int, int, int]:
    """(weight rows per thread, 32-code chunks per lane, warps, programs per SM) for an [n, k] weight and m rows of
    x: the H100 sweep's best (bench/gemv_smem_sweep.py): tall weights take more rows per thread, wide or square ones
    more chunks; more rows of x, fewer weight rows per thread (registers)."""
    if m > 1:
        return (2, 1, 8, 1) if m > 2 else (4, 1, 8, 1)
    return (8, 1, 8, 1) if n >= 2 * k else (4, 2, 8, 1)


def gemv_4bit(
    x: torch.Tensor,
    raw: torch.Tensor,
    state: QuantState,
    bias: torch.Tensor | None = None,
    xa: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    lora_scale: float = 1.0,
    residual: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
    pdl: bool = True,
) -> torch.Tensor:
    """``x [M, K] @ dequant(W)^T + bias + lora_scale * xa @ lora_b^T`` then ``+ residual`` for M <= MAX_ROWS rows
    (the weight is read once for all), with the arguments and rounding of
    :func:`kbit.kernels.triton.gemv4.gemv_4bit` (``xa``: for one row x A^T or lora_down's partial sums, for more
    x A^T [M, r]), for a word-aligned packed weight whose table is built (:func:`smem_table`). ``config``: (weight
    rows per thread, chunks per lane, warps, programs per SM), by default :func:`config_for`'s.
    ``pdl``: launched as a programmatic dependent of the previous kernel (Hopper)."""
    m, k = x.shape
    n = state.shape[0]
    rt, rep, warps, per_sm = config or config_for(n, k, m)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    from .gemv4 import nested_args  # gemv4 imports this module lazily: no cycle at import time

    extra, nested_bs = nested_args(state)
    has_lora = xa is not None
    rank = lora_b.shape[1] if has_lora else 1
    if has_lora and xa.stride(1) != 1:
        xa = xa.contiguous()
    parts = xa.shape[0] // m if has_lora else 1  # one row: lora_down's partial sums; more: x A^T itself
    groups = triton.cdiv(n, rt * warps)
    grid = (min(groups, _sm_count(x.device) * per_sm),)
    _gemv4_smem_kernel[grid](
        x.view(torch.int32), raw.reshape(-1).view(torch.int32), state.absmax, smem_table(state.code),
        *extra,
        bias if bias is not None else out, xa if has_lora else out, lora_b.contiguous() if has_lora else out,
        residual.contiguous() if residual is not None else out, out, m, n, k, k // 8, k // state.blocksize, groups,
        rank, parts, xa.stride(0) if has_lora else 0, float(lora_scale), BS=state.blocksize, NESTED=state.nested,
        NESTED_BS=nested_bs, RT=rt, REP=rep, NUM_WARPS=warps, PDL=pdl, XR=triton.next_power_of_2(m),
        RP=triton.next_power_of_2(rank), XSP=triton.next_power_of_2(parts), HAS_BIAS=bias is not None,
        HAS_LORA=has_lora, HAS_RES=residual is not None, num_warps=warps, launch_pdl=pdl,
    )  # fmt: skip
    return out


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
