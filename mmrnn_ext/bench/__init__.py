"""mmrnn-bench (``mmrnn-bench``, ``python -m mmrnn_ext.bench``): mmrnn_ext against what users run
today, side by side in one process. One concern per file (cli.py's docstring is the command's help):

    cli.py         the command line: options, their checks, each mode's run
    cases.py       the shape grids, dtypes, passes and cells; the paired models
    providers.py   what is timed beside mmrnn_ext (torch's module, the eager loop, torch.compile,
                   ONNX Runtime), the output checks, which path torch took
    grid.py        one case of the grid: every provider and pass, checked, timed, measured
    timing.py      providers taking turns on CPU, do_bench on GPU, spreads, impossible rates
    memory.py      saved activations and peak memory
    machine.py     the CPU's description, the GEMM ceiling, a case's GEMM FLOPs and rates
    report.py      text tables, the README's markdown table, the plot, the progress line
    decode.py      --decode: one cell step at a time
    train_step.py  --train-step: the cells with gradients, per-step images, the attention decoder
    migrate.py     --migrate: torch models before and after mmrnn_ext.convert

The names below are the ones scripts and tests use (bench/update_readme.py, bench/*.sh, tests/).
"""

from .cases import (CELL_MODULES, CELLS, CPU_GRID, DECODE_SHAPES, DTYPES, GPU_GRID, OURS, PASSES, QUICK_CPU_GRID,
                    QUICK_DECODE_SHAPES, QUICK_GPU_GRID, SERVING_GRID, Case, DisagreementError, build_ours, build_stock,
                    stock_name)
from .cli import main, parse_args
from .decode import decode_providers, decode_rows
from .machine import gemm_ceiling, machine_info
from .providers import ONNX_RUNTIME, eager_loop, make_providers, stock_path
from .report import markdown_table
from .timing import NOISY_SPREAD, cpu_turns, side_by_side_stats, time_ms

__all__ = ["CELL_MODULES", "CELLS", "CPU_GRID", "Case", "DECODE_SHAPES", "DTYPES", "DisagreementError", "GPU_GRID",
           "NOISY_SPREAD", "ONNX_RUNTIME", "OURS", "PASSES", "QUICK_CPU_GRID", "QUICK_DECODE_SHAPES", "QUICK_GPU_GRID",
           "SERVING_GRID", "build_ours", "build_stock", "cpu_turns", "decode_providers", "decode_rows", "eager_loop",
           "gemm_ceiling", "machine_info", "main", "make_providers", "markdown_table", "parse_args", "side_by_side_stats",
           "stock_name", "stock_path", "time_ms"]
