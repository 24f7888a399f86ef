"""W4A16 on the GPU: one Triton dequant-GEMM over core's layout (:mod:`sagellm.quant.w4a16`).

Each program multiplies a ``BLOCK_M`` x ``BLOCK_N`` output tile over one split of the inputs:
it reads the packed int32 rows of its outputs (eight inputs a word, contiguous along the
outputs, so loads are coalesced), unpacks the nibbles, applies the group's scale and zero in
registers and multiplies; the 16-bit weight never exists in memory. Act-order weights gather
their activation columns through ``perm`` inside the load.

* Prefill (many rows): ``tl.dot`` tiles, no split.
* Decode (``M <= 16``): the device's tuned table (:mod:`sagellm_cuda.gemv_tiles`) where it
  has the shape, else a heuristic. The weight read is the whole cost, so the inputs are split
  (``SPLIT_K``) until the programs fill the GPU a few times over; the last split of each tile
  sums the float32 partials in the same launch (:mod:`sagellm_cuda.split_k`). ``BLOCK_M == 1``
  (the heuristic's for one row) multiplies without ``tl.dot``, one row a program.

Launch sizes depend on shapes only (never on values), and nothing reads the device from the
host, so a captured CUDA graph replays it.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from sagellm.quant.w4a16 import W4A16Weight
from sagellm_cuda.split_k import plan_split, split_buffers, split_counters, store_tile


@triton.jit
def _codes_to_float(codes):
    """Nibble values (int32, 0..15) as float32 without an integer conversion instruction (a
    quarter-rate one on Hopper, and four of them a weight would bound the decode product):
    the code goes into the mantissa of 2**23 (an OR) and 2**23 is subtracted (exact)."""
    return (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _w4a16_kernel(x_ptr, q_ptr, s_ptr, z_ptr, perm_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K,
                  stride_xm, k_per_split, GROUP: tl.constexpr, HAS_PERM: tl.constexpr,
                  USE_DOT: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr,
                  WORDS_ONCE: tl.constexpr, TILE_GROUPS: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out[m, n] = sum over k of x[m, perm[k]] * w[k, n]``,
    ``w[k, n] = (code(k, n) - zeros[k // GROUP, n]) * scales[k // GROUP, n]``. ``SPLIT``: each
    split stores its partial and the last to arrive sums them (:mod:`sagellm_cuda.split_k`).
    Without ``USE_DOT`` a program is one row (program axis 1).

    ``WORDS_ONCE`` (decode): each packed word is loaded once, as a ``[BLOCK_K // 8, BLOCK_N]``
    tile, and its eight nibbles are shifted out into a third axis, so the load instructions
    move half a byte per weight. Otherwise (prefill) each input row of the tile loads its own
    word (the eight rows of one word hit the L1), which is simpler for the compiler to lay out
    for ``tl.dot`` but moves four bytes per weight through the load units: a decode GEMV is
    bound by exactly that traffic.

    ``TILE_GROUPS`` (:func:`tile_groups`): how many scale groups a ``BLOCK_K`` tile holds when
    they can be factored out of its sums (1: the tile lies in one group), 0 when they cannot
    (then each weight is dequantized on its own, in the scale's dtype)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_begin = pid_k * k_per_split
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    BLOCK_W: tl.constexpr = BLOCK_K // 8
    for kk in range(0, k_per_split, BLOCK_K):
        offs_k = k_begin + kk + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        if HAS_PERM:
            cols = tl.load(perm_ptr + offs_k, mask=k_ok, other=0)
        else:
            cols = offs_k
        if WORDS_ONCE:
            offs_w = (k_begin + kk) // 8 + tl.arange(0, BLOCK_W)
            words = tl.load(q_ptr + offs_w[:, None] * N + offs_n[None, :],
                            mask=(offs_w[:, None] < K // 8) & n_ok[None, :], other=0)
            shifts = tl.arange(0, 8) * 4
            # [BLOCK_W, 8, BLOCK_N]: input 8 * w + j is nibble j of word w (core's layout).
            codes3 = (words[:, None, :] >> shifts[None, :, None]) & 0xF
        else:
            words = tl.load(q_ptr + (offs_k // 8)[:, None] * N + offs_n[None, :],
                            mask=k_ok[:, None] & n_ok[None, :], other=0)
            codes = (words >> ((offs_k % 8) * 4)[:, None]) & 0xF
        one_group: tl.constexpr = TILE_GROUPS == 1  # the whole tile is in one group
        if one_group:
            # The last split's last tiles may lie past K: their group row does not exist, and
            # an unmasked read there can be NaN/inf (times a zero code is still NaN).
            g = (k_begin + kk) // GROUP
            g_ok = n_ok & (offs_n * 0 + (k_begin + kk) < K)
            scale = tl.load(s_ptr + g * N + offs_n, mask=g_ok, other=0.0)
            zero = tl.load(z_ptr + g * N + offs_n, mask=g_ok, other=0.0)
        if WORDS_ONCE and not USE_DOT and one_group:
            # One row, one group: sum_k (c - z) * s * x = s * (sum_k c * x - z * sum_k x), so
            # the scale and zero apply once per tile instead of once per weight.
            a = tl.load(x_ptr + pid_m * stride_xm + cols, mask=k_ok, other=0.0).to(tl.float32)
            a3 = tl.reshape(a, (BLOCK_W, 8))
            cx = tl.sum(tl.sum(_codes_to_float(codes3) * a3[:, :, None], axis=1), axis=0)
            acc += (cx - zero.to(tl.float32) * tl.sum(a, axis=0)) * scale.to(tl.float32)
        elif WORDS_ONCE and not USE_DOT and TILE_GROUPS > 1:
            # One row, several whole groups: the same factoring per group, on [groups, N] sums
            # (float32 throughout, like the one-group tile).
            GROUP_W: tl.constexpr = GROUP // 8
            a = tl.load(x_ptr + pid_m * stride_xm + cols, mask=k_ok, other=0.0).to(tl.float32)
            a3 = tl.reshape(a, (BLOCK_W, 8))
            cw = tl.sum(_codes_to_float(codes3) * a3[:, :, None], axis=1)  # [BLOCK_W, BLOCK_N]
            cx = tl.sum(tl.reshape(cw, (TILE_GROUPS, GROUP_W, BLOCK_N)), axis=1)
            a_sums = tl.sum(tl.reshape(a, (TILE_GROUPS, GROUP)), axis=1)
            offs_g = (k_begin + kk) // GROUP + tl.arange(0, TILE_GROUPS)
            gn = offs_g[:, None] * N + offs_n[None, :]
            gn_ok = (offs_g[:, None] * GROUP < K) & n_ok[None, :]
            scale2 = tl.load(s_ptr + gn, mask=gn_ok, other=0.0).to(tl.float32)
            zero2 = tl.load(z_ptr + gn, mask=gn_ok, other=0.0).to(tl.float32)
            acc += tl.sum((cx - zero2 * a_sums[:, None]) * scale2, axis=0)
        else:
            if WORDS_ONCE:
                codes = tl.reshape(codes3, (BLOCK_K, BLOCK_N))
            if WORDS_ONCE:
                cf = _codes_to_float(codes)
            else:
                cf = codes  # prefill: converted straight to the scale's dtype
            if one_group:
                w = (cf.to(scale.dtype) - zero[None, :]) * scale[None, :]
            else:
                gk = (offs_k // GROUP)[:, None] * N + offs_n[None, :]
                kn_ok = k_ok[:, None] & n_ok[None, :]
                scale2 = tl.load(s_ptr + gk, mask=kn_ok, other=0.0)
                zero2 = tl.load(z_ptr + gk, mask=kn_ok, other=0.0)
                w = (cf.to(scale2.dtype) - zero2) * scale2
            if USE_DOT:
                a = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                if IEEE:
                    acc += tl.dot(a, w.to(a.dtype), input_precision="ieee")
                else:
                    acc += tl.dot(a, w.to(a.dtype))
            else:
                a = tl.load(x_ptr + pid_m * stride_xm + cols, mask=k_ok, other=0.0)
                acc += tl.sum(w.to(tl.float32) * a.to(tl.float32)[:, None], axis=0)
    store_tile(acc, out_ptr, part_ptr, cnt_ptr, offs_m, offs_n, m_ok, n_ok, pid_m, pid_n, pid_k,
               M, N, USE_DOT, SPLIT)


@functools.cache
def _num_sms(device_index: int | None) -> int:
    if not torch.cuda.is_available():
        return 8  # Triton's interpreter: small grids, few splits
    return torch.cuda.get_device_properties(device_index or 0).multi_processor_count


#: Shared memory a program may use when the device cannot be asked (Triton's interpreter); an
#: H100/H200 allows 227 KiB, an A100 163 KiB.
_DEFAULT_SMEM = 160 * 1024


@functools.cache
def _smem_per_block(device_index: int | None) -> int:
    if not torch.cuda.is_available():
        return _DEFAULT_SMEM
    props = torch.cuda.get_device_properties(device_index or 0)
    return int(getattr(props, "shared_memory_per_block_optin", _DEFAULT_SMEM))


#: Tiles of at most this many rows are decode tiles, which load each packed word once
#: (``WORDS_ONCE`` in the kernel).
DECODE_ROWS = 16


def words_once(block_m: int) -> bool:
    """Whether a tile of ``block_m`` rows loads each packed word once (decode tiles)."""
    return block_m <= DECODE_ROWS


def tile_groups(block_k: int, group: int) -> int:
    """The kernel's ``TILE_GROUPS``: 1 when a ``block_k`` tile lies inside one scale group, the
    number of whole groups it holds when ``group`` divides it into whole packed words (so a
    one-row tile sums each group before its scale applies), else 0."""
    if group % block_k == 0:
        return 1
    if block_k % group == 0 and group % 8 == 0:
        return block_k // group
    return 0


def stage_bytes(block_m: int, block_n: int, block_k: int, group: int) -> int:
    """Shared memory one pipeline stage of the kernel holds: the packed words of the weight
    tile (once per word for a decode tile, else staged as int32 once per input row before the
    unpack), the activation tile and the tile's scale and zero rows."""
    group_rows = max(1, block_k // group)
    word_rows = block_k // 8 if words_once(block_m) else block_k
    return 4 * word_rows * block_n + 2 * block_m * block_k + 2 * 2 * group_rows * block_n


def fit_stages(cfg: dict[str, int], group: int, smem: int) -> dict[str, int]:
    """``cfg`` with ``num_stages`` lowered until the stages fit in ``smem`` bytes (8 KiB kept
    back for the compiler's own scratch)."""
    per = stage_bytes(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], group)
    fits = max(1, (smem - 8 * 1024) // per)
    return dict(cfg, num_stages=max(1, min(cfg["num_stages"], fits)))


def launch_config(m: int, n: int, k: int, group: int, num_sms: int,
                  smem: int = _DEFAULT_SMEM) -> dict[str, int]:
    """Tile sizes and the input split for an ``[m, k] x [k, n]`` product, with no more pipeline
    stages than ``smem`` bytes of shared memory hold."""
    block_k = 128 if group % 128 == 0 else group if group in (32, 64) else 64
    if m <= DECODE_ROWS:
        block_m = 1 if m == 1 else DECODE_ROWS
        block_n = 128 if n >= 2048 else 64
        tiles = triton.cdiv(n, block_n)
        k_blocks = triton.cdiv(k, block_k)
        # A few waves of programs: the decode product is a pure weight read.
        split = max(1, min(k_blocks, (4 * num_sms) // max(tiles, 1), 16))
        # A one-row tile holds its unpacked [BLOCK_K, BLOCK_N] weights in registers.
        warps = 8 if block_n * block_k >= 16384 else 4
        return fit_stages(dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                               SPLIT_K=split, num_warps=warps, num_stages=4), group, smem)
    block_m = 64 if m <= 64 else 128
    return fit_stages(dict(BLOCK_M=block_m, BLOCK_N=128,
                           BLOCK_K=64 if group % 64 == 0 else block_k, SPLIT_K=1,
                           num_warps=8 if block_m == 128 else 4, num_stages=3), group, smem)


#: Configs that needed fewer stages than :func:`fit_stages` estimated: (shape key) -> stages.
_STAGE_OVERRIDES: dict[tuple[int, ...], int] = {}


def _launch(grid: tuple[int, int, int], args: tuple, consts: dict[str, object],
            cfg: dict[str, int]) -> None:
    """Launch with ``cfg``; a compile the device refuses for shared memory retries with one
    stage fewer (remembered for the shape), down to a single stage."""
    key = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], int(consts["GROUP"]),  # type: ignore[call-overload]
           int(bool(consts["HAS_PERM"])), int(bool(consts["USE_DOT"])))
    stages = min(cfg["num_stages"], _STAGE_OVERRIDES.get(key, cfg["num_stages"]))
    while True:
        try:
            _w4a16_kernel[grid](*args, **consts, **dict(cfg, num_stages=stages))
            return
        except OutOfResources:
            if stages == 1:
                raise
            stages -= 1
            _STAGE_OVERRIDES[key] = stages


def decode_config(m: int, n: int, k: int, group: int, dtype: torch.dtype,
                  device: torch.device) -> dict[str, int] | None:
    """The device's tuned decode config for the shape (:mod:`sagellm_cuda.gemv_tiles`), its
    stages fitted to shared memory; None without one (then :func:`launch_config`)."""
    from sagellm_cuda.gemv_tiles import tuned_config

    cfg = tuned_config("int4", m, n, k, group, dtype, device)
    return None if cfg is None else fit_stages(cfg, group, _smem_per_block(device.index))


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor, perm: torch.Tensor | None, group: int,
                 config: dict[str, int] | None = None) -> torch.Tensor:
    """``x [M, K] @ W`` -> ``[M, N]`` in ``x``'s dtype, ``W`` in core's W4A16 layout."""
    m, k = x.shape
    n = qweight.shape[1]
    assert qweight.shape[0] * 8 == k and scales.shape == zeros.shape == (k // group, n)
    assert scales.dtype == x.dtype, "scales/zeros must be in the activation dtype"
    x = x.contiguous()
    if m == 0:
        return x.new_empty((0, n))
    cfg = dict(config or decode_config(m, n, k, group, x.dtype, x.device)
               or launch_config(m, n, k, group, _num_sms(x.device.index),
                                _smem_per_block(x.device.index)))
    use_dot = cfg["BLOCK_M"] > 1
    n_programs = triton.cdiv(n, cfg["BLOCK_N"])
    m_programs = triton.cdiv(m, cfg["BLOCK_M"]) if use_dot else m
    k_per_split, split = plan_split(k, cfg["BLOCK_K"], cfg.pop("SPLIT_K"), n_programs * m_programs)
    grid = (n_programs, m_programs, split)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    part, counters = split_buffers(out, split)
    _launch(grid, (x, qweight, scales, zeros, perm if perm is not None else qweight, out, part,
                   counters, m, n, k, x.stride(0), k_per_split),
            dict(GROUP=group, HAS_PERM=perm is not None, USE_DOT=use_dot,
                 IEEE=x.dtype == torch.float32, SPLIT=split > 1,
                 WORDS_ONCE=words_once(cfg["BLOCK_M"]),
                 TILE_GROUPS=tile_groups(cfg["BLOCK_K"], group)), cfg)
    return out


class TritonW4A16Weight(W4A16Weight):
    """Core's W4A16 weight (``--quantization int4``) multiplied by :func:`w4a16_matmul`."""

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        self._for(x)
        if x.is_cuda:  # at the first (eager) product, never first inside a graph capture
            split_counters(x.device)
        lead = x.shape[:-1]
        y = w4a16_matmul(x.reshape(-1, x.shape[-1]), self.qweight, self.scales, self.zeros,
                         self.perm, self.group)
        return y.view(*lead, self.out_features)
