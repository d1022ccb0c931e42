"""Launch planning shared by the three cells' launchers (kernels/rnn.py, lstm.py, gru.py), written once:
the form by size (choose_form, persistent_fits), the tiles (Config, default_config: what the sweep on
an H100 chose, bench/NOTES.md, bench/results/gpu_h100_sweep.json), how float32 dots run (the TF32
policy), the grid and the cooperative launch options; plan() puts them together for one launch."""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton

FORMS = ("auto", "step", "persistent", "cooperative")
MIN_DOT = 16  # tl.dot needs every dimension of its operands >= 16
BATCH_TILE = MIN_DOT  # batch rows per program in the persistent and step forms: the smallest dot tile


def padded_hidden(H: int) -> int:
    """The hidden size as a persistent program's row holds it: a power of two, at least one dot tile."""
    return max(MIN_DOT, triton.next_power_of_2(H))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def allow_tf32(dtype: torch.dtype, device_type: str = "cuda") -> bool:
    """TF32 dots for float32 CUDA tensors only where the user allowed TF32 to torch (as nn.RNN does
    via cuDNN). CPU tensors (Triton's interpreter) have no TF32: full precision."""
    return (dtype == torch.float32 and device_type == "cuda"
            and bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32))


def round_tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 -> nearest TF32 value (ties away from zero), as float32; the same rounding as the
    kernels' _round_tf32. NaN stays NaN."""
    bits = t.contiguous().view(torch.int32)
    rounded = ((bits + 0x1000) & -8192).view(torch.float32)
    return torch.where(torch.isnan(t), t, rounded)


def _fp32_dot(dtype: torch.dtype, device_type: str, cfg: "Config", B: int, H: int, backward: bool) -> str:
    """How float32 dots run: "tf32" where torch allows TF32; otherwise float32 accuracy either as
    "tf32x3" (Triton's three-pass TF32 split on tensor cores: 2.4-3.5e-7 relative vs float64 at the
    benchmark shapes, no worse than FMA's 2.4-6.9e-7, and 1.1-4.7x faster in the forward) or "ieee"
    (FMA), which the backward keeps below 64x256 outputs per step, where it measured faster
    (bench/NOTES.md)."""
    if dtype != torch.float32:
        return "ieee"  # unused: 16-bit operands
    if allow_tf32(dtype, device_type):
        return "tf32"
    if cfg.fp32_dot:
        return cfg.fp32_dot
    if device_type != "cuda":
        return "ieee"
    return "ieee" if backward and B * H < 64 * 256 else "tf32x3"


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Under TRITON_INTERPRET, Triton's interpreter (3.9) multiplies the raw uint16 bits of bfloat16
    dot operands; upcasting them to float32 first computes the same exact products."""
    return dtype == torch.bfloat16 and _interpreting()


def fast_tanh(dtype: torch.dtype, device_type: str = "cuda") -> bool:
    """tanh.approx.f32 (relative error ~2^-11, under the 2^-8 of a bfloat16 and the 2^-11 of a
    float16 output rounding) for 16-bit outputs on a GPU; float32 keeps the exact tanh."""
    return dtype in (torch.bfloat16, torch.float16) and device_type == "cuda" and not _interpreting()


def persistent_fits(H: int, dtype: torch.dtype, gates: int = 1) -> bool:
    """Whether W_hh ([gates * H, H]) fits on chip for the persistent form: gates * Hp^2 elements
    (Hp = H padded to a power of two) within the RNN's measured bound, 256^2 in 16-bit dtypes and
    128^2 in float32 (see the module docstring). LSTM (4 gates): hidden <= 128 in 16-bit dtypes,
    <= 64 in float32; GRU (3 gates) the same."""
    hp = padded_hidden(H)
    return gates * hp * hp <= (128 * 128 if dtype == torch.float32 else 256 * 256)


def choose_form(H: int, dtype: torch.dtype, form: str | None = None, gates: int = 1) -> str:
    """auto: persistent wherever W_hh fits on chip (one program per batch tile runs the whole chain
    with no grid barrier: faster than the cooperative form at every such size measured,
    bench/NOTES.md), else cooperative. step only on request. gates: 1 (RNN), 4 (LSTM), 3 (GRU)."""
    form = form or os.environ.get("MMRNN_TRITON_FORM", "auto")
    if form not in FORMS:
        raise ValueError(f"form: expected one of {FORMS} (or MMRNN_TRITON_FORM unset), got {form!r}")
    if form == "auto":
        return "persistent" if persistent_fits(H, dtype, gates) else "cooperative"
    return form


class Config(NamedTuple):
    """Tile of a form: [block_b, block_n] outputs per program (persistent: block_n = the padded
    hidden row), K loop of block_k; fast_tanh: None = by dtype and device (see fast_tanh)."""
    block_b: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    fast_tanh: bool | None = None
    fp32_dot: str | None = None  # float32 with TF32 off: None (by size, see _fp32_dot), "ieee" or "tf32x3"


def _resident_programs(device: torch.device) -> int:
    """How many programs of the cooperative form may run at once: one per SM on a GPU; one under
    Triton's interpreter, which runs programs one after another (a grid barrier would never open)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_config(B: int, H: int, dtype: torch.dtype, device: torch.device, form: str) -> Config:
    """The tiles the sweep on an H100 chose (bench/NOTES.md, bench/results/gpu_h100_sweep.json)."""
    hp = padded_hidden(H)
    if form == "persistent":  # 4 warps: faster than 8 at hidden 128 and 256 in both passes
        return Config(BATCH_TILE, hp, hp, 4)
    block_k = min(64 if dtype == torch.float32 else 128, hp)  # fewer, longer dots per step
    if form == "step":
        return Config(BATCH_TILE, min(64, hp), block_k)
    # cooperative: the smallest tiles whose count still fits the resident programs
    slots = _resident_programs(device)
    block_b = max(MIN_DOT, min(64, triton.next_power_of_2(B)))
    n_tb = triton.cdiv(B, block_b)
    block_n, widest = MIN_DOT, min(128, hp)
    while block_n < widest and n_tb * triton.cdiv(H, block_n) > slots:
        block_n *= 2
    return Config(block_b, block_n, block_k)


@functools.lru_cache(maxsize=None)
def _cooperative_launch_supported() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_cooperative_grid" in CUDAOptions.__dataclass_fields__


def _launch_options(device: torch.device) -> dict:
    """The cooperative form asks the driver for a cooperative launch where this Triton offers it: the
    launch then fails, rather than hangs, if its programs could not all be resident at once."""
    return {"launch_cooperative_grid": True} if device.type == "cuda" and _cooperative_launch_supported() else {}


def _grid(cfg: Config, B: int, H: int, device: torch.device, form: str):
    tiles_b, tiles_n = triton.cdiv(B, cfg.block_b), triton.cdiv(H, cfg.block_n)
    if form == "step":
        return (tiles_b, tiles_n)
    return (min(tiles_b * tiles_n, _resident_programs(device)),)


def _check_int32_offsets(t: torch.Tensor) -> None:
    if t.numel() >= 2 ** 31:
        raise ValueError(f"xp: the Triton kernels index with 32-bit offsets; got {t.numel()} elements (>= 2**31)")


class Launch(NamedTuple):
    """One launch, planned: the form, the grid, the constexpr flags every cell's kernels take (FP32_DOT,
    DOT_FP32), the tile constexprs and launch options (`blocks`), W_hh as the dots read it (rounded to
    TF32 where TF32 dots run) and the Config the tiles came from."""
    form: str
    grid: tuple
    flags: dict
    blocks: dict
    w_hh: torch.Tensor
    config: Config


def plan(x: torch.Tensor, B: int, H: int, w_hh: torch.Tensor, form: str | None, config: Config | None,
         backward: bool) -> Launch:
    """The launch of one forward or backward on tensors like x ([T, B, *]); the form by size with W_hh's
    gate count (1: RNN, 4: LSTM, 3: GRU) unless `form` names one; the tiles from `config` or by size."""
    _check_int32_offsets(x)
    gates = w_hh.shape[0] // H
    form = choose_form(H, x.dtype, form, gates=gates)
    cfg = config or default_config(B, H, x.dtype, x.device, form)
    fp32_dot = _fp32_dot(x.dtype, x.device.type, cfg, B, H, backward=backward)
    if gates > 1 and form == "persistent" and not backward and fp32_dot == "ieee" and x.device.type == "cuda":
        # never the default (the forward's float32 dots are tf32 or tf32x3); a tuning Config may ask
        raise ValueError("config: the gated persistent forward has no fp32_dot='ieee' (FMA dots over all gate "
                         "blocks: Triton 3.9's compiler aborts on the LSTM's and spills the GRU's, "
                         "bench/sm90_resources.py); use fp32_dot='tf32x3' (float32 accuracy on tensor cores)")
    if fp32_dot == "tf32":
        w_hh = round_tf32(w_hh)
    flags = dict(FP32_DOT=fp32_dot, DOT_FP32=dot_in_fp32(x.dtype))
    if form == "persistent":
        blocks = dict(BLOCK_B=cfg.block_b, BLOCK_H=padded_hidden(H), num_warps=cfg.num_warps)
        return Launch(form, (triton.cdiv(B, cfg.block_b),), flags, blocks, w_hh, cfg)
    blocks = dict(BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    if form == "cooperative":
        blocks.update(_launch_options(x.device))
    return Launch(form, _grid(cfg, B, H, x.device, form), flags, blocks, w_hh, cfg)
