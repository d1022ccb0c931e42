"""The benchmark cases: the shape grids, the dtypes and passes, the cells, and the paired models (ours, torch's on the concatenation)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import mmrnn_ext

CPU_GRID = [(32, 128, 128, 128, 64), (32, 128, 128, 128, 256), (64, 256, 256, 512, 512), (8, 512, 128, 256, 1024)]
GPU_GRID = [(16, 256, 128, 256, 128), (64, 256, 256, 512, 256), (64, 256, 512, 1024, 512),
            (256, 128, 1024, 2048, 1024), (1, 1024, 64, 64, 256)]
# what served recurrent models see on CPUs: batch 1 to 64, hidden 256 to 1024 (one not a power of two)
SERVING_GRID = [(32, 128, 128, 64, 256), (64, 256, 256, 64, 512), (8, 512, 128, 64, 1024), (1, 512, 128, 64, 256),
                (24, 100, 96, 64, 320)]
QUICK_CPU_GRID = [(8, 32, 32, 32, 64), (16, 64, 64, 64, 128)]
# decoding: one cell call per generated token, (B, I, V, H); a round runs DECODE_STEPS steps
DECODE_SHAPES = [(1, 128, 64, 256), (16, 256, 64, 512)]
QUICK_DECODE_SHAPES = [(1, 16, 8, 32), (4, 32, 8, 64)]
DECODE_STEPS = 64
QUICK_GPU_GRID = [(16, 64, 128, 256, 128), (1, 128, 64, 64, 256)]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
PASSES = ("forward", "forward+backward")
OURS = "mmrnn_ext"
CELLS = {"rnn": (mmrnn_ext.RNN, torch.nn.RNN, 1), "lstm": (mmrnn_ext.LSTM, torch.nn.LSTM, 4),
         "gru": (mmrnn_ext.GRU, torch.nn.GRU, 3)}
CELL_MODULES = {"rnn": (mmrnn_ext.RNNCell, torch.nn.RNNCell), "lstm": (mmrnn_ext.LSTMCell, torch.nn.LSTMCell),
                "gru": (mmrnn_ext.GRUCell, torch.nn.GRUCell)}


def stock_name(cell: str) -> str:
    return f"nn.{cell.upper()}(concat)"


class DisagreementError(RuntimeError):
    pass


# --- the providers --------------------------------------------------------------------------------

@dataclass
class Case:
    B: int
    T: int
    I: int
    V: int
    H: int
    dtype: torch.dtype
    device: torch.device
    layers: int = 1
    bidirectional: bool = False
    cell: str = "rnn"
    x: torch.Tensor = field(init=False)
    image: torch.Tensor = field(init=False)

    def __post_init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(self.T, self.B, self.I, generator=g).to(self.device, self.dtype)
        self.image = torch.randn(self.B, self.V, generator=g).to(self.device, self.dtype)

    @property
    def shape(self):
        return (self.B, self.T, self.I, self.V, self.H)


def build_ours(case: Case, backend: str = "auto") -> torch.nn.Module:
    torch.manual_seed(0)
    model = CELLS[case.cell][0](case.I, case.H, case.layers, bidirectional=case.bidirectional, image_size=case.V,
                                backend=backend, device=case.device, dtype=case.dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("weight_img") and not name.startswith("weight_img_l0"):
                p.zero_()  # image at layer 0 only: the function nn.RNN on the concatenation computes
    return model


def build_stock(case: Case, ours: torch.nn.Module) -> torch.nn.Module:
    stock = CELLS[case.cell][1](case.I + case.V, case.H, case.layers, bidirectional=case.bidirectional,
                                device=case.device, dtype=case.dtype)
    with torch.no_grad():
        for name, p in stock.named_parameters():
            src = getattr(ours, name)
            if name.startswith("weight_ih_l0"):
                p.copy_(torch.cat([src, getattr(ours, name.replace("weight_ih", "weight_img"))], dim=1))
            else:
                p.copy_(src)
    return stock
