"""mmrnn-bench --decode: one cell step at a time, against torch's cells."""

from __future__ import annotations

import statistics

import torch

from .cases import (CELLS, CELL_MODULES, DECODE_SHAPES, DECODE_STEPS, DisagreementError, OURS, QUICK_DECODE_SHAPES,
                    stock_name)
from .machine import machine_info
from .providers import relative_difference, tolerance
from .report import run_rows
from .timing import cpu_turns


def decode_providers(cell: str, B: int, I: int, V: int, H: int, steps: int) -> dict:
    """{name: callable running `steps` decoding steps from a zero state, returning the last h}:
    our cell and torch's cell on the concatenated input, and both modules called with T = 1 and a
    carried state (the concatenation is prepared once, outside the timing: torch's side pays nothing
    for the image). float32, no_grad."""
    ours_cls, stock_cls = CELL_MODULES[cell]
    torch.manual_seed(0)
    ours_cell = ours_cls(I, H, image_size=V)
    stock_cell = stock_cls(I + V, H)
    ours_mod = CELLS[cell][0](I, H, image_size=V)
    stock_mod = CELLS[cell][1](I + V, H)
    with torch.no_grad():
        for name, p in ours_cell.named_parameters():  # one set of weights for all four
            getattr(ours_mod, name + "_l0").copy_(p)
        for o, s_ in ((ours_cell, stock_cell), (ours_mod, stock_mod)):
            suffix = "_l0" if o is ours_mod else ""
            for name, p in s_.named_parameters():
                src = getattr(o, name)
                if name == "weight_ih" + suffix:
                    p.copy_(torch.cat([src, getattr(o, "weight_img" + suffix)], dim=1))
                else:
                    p.copy_(src)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps, B, I, generator=g)
    v = torch.randn(B, V, generator=g)
    xc = torch.cat([x, v.expand(steps, -1, -1)], dim=-1)
    lstm = cell == "lstm"

    def zeros(*lead):
        z = torch.zeros(*lead, B, H)
        return (z, z.clone()) if lstm else z

    def first(state):
        return state[0] if lstm else state

    def ours_cell_run():
        state = zeros()
        for t in range(steps):
            state = ours_cell(x[t], state, image=v)
        return first(state)

    def stock_cell_run():
        state = zeros()
        for t in range(steps):
            state = stock_cell(xc[t], state)
        return first(state)

    def ours_mod_run():
        state = zeros(1)
        for t in range(steps):
            _, state = ours_mod(x[t:t + 1], state, image=v)
        return first(state)[0]

    def stock_mod_run():
        state = zeros(1)
        for t in range(steps):
            _, state = stock_mod(xc[t:t + 1], state)
        return first(state)[0]

    return {f"{OURS} cell": ours_cell_run, f"nn.{cell.upper()}Cell(concat)": stock_cell_run,
            f"{OURS} module T=1": ours_mod_run, f"{stock_name(cell)} T=1": stock_mod_run}


def decode_rows(cell: str, shapes, rounds: int, steps: int = DECODE_STEPS) -> list:
    """µs per decoding step for every provider (rounds of `steps` steps taking turns, as
    side_by_side_stats): median and minimum over the rounds; outputs checked against ours first."""
    rows = []
    for B, I, V, H in shapes:
        providers = decode_providers(cell, B, I, V, H, steps)
        with torch.no_grad():
            reference = providers[f"{OURS} cell"]()
            for name, fn in providers.items():
                diff = relative_difference(fn(), reference)
                if not diff <= tolerance(torch.float32, torch.device("cpu")):
                    raise DisagreementError(f"decode: {name} disagrees with {OURS} cell at (B,I,V,H) = "
                                            f"{(B, I, V, H)}: relative difference {diff:.3e}")
            times = {name: [t / steps * 1e6 for t in ts] for name, ts in cpu_turns(providers, rounds).items()}
        stock_cell = times[f"nn.{cell.upper()}Cell(concat)"]
        for name, t in times.items():
            rows.append({"cell": cell, "B": B, "I": I, "V": V, "H": H, "provider": name,
                         "us_per_step": statistics.median(t), "us_per_step_min": min(t), "rounds": rounds,
                         "steps_per_round": steps,
                         "torch_cell_over_this": statistics.median(stock_cell) / statistics.median(t)})
    return rows


def format_decode(rows: list) -> str:
    lines = [f"  {'cell':5} {'B,I,V,H':16} {'provider':28} {'us/step':>9} {'min':>9} {'torch cell / this':>18}"]
    for r in rows:
        shape = f"{r['B']},{r['I']},{r['V']},{r['H']}"
        lines.append(f"  {r['cell']:5} {shape:16} {r['provider']:28} {r['us_per_step']:9.1f} {r['us_per_step_min']:9.1f} "
                     f"{r['torch_cell_over_this']:18.2f}")
    return "\n".join(lines)


def decode_main(args, device) -> int:
    if args.shape:
        raise SystemExit("--decode: the decoding shapes are fixed (B,I,V,H) = "
                         f"{DECODE_SHAPES}; --shape applies to the grid")
    machine = machine_info(device)
    shapes = QUICK_DECODE_SHAPES if args.quick else DECODE_SHAPES
    rounds = args.repeats or (3 if args.quick else 9)
    header = (f"mmrnn-bench --decode --cell {args.cell}: {machine['cpu_model']} ({machine['cpu_vendor']}; engine path "
              f"{machine['engine_isa']}), torch {torch.__version__}, {DECODE_STEPS} steps a round, {rounds} rounds")
    return run_rows(header, lambda: decode_rows(args.cell, shapes, rounds), format_decode, args.json,
                    {"machine": machine, "cell": args.cell, "key": "decode"})
