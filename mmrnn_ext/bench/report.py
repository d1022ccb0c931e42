"""The reports: text tables, the README's markdown table, the plot and the progress line."""

from __future__ import annotations

import json
import sys

from .cases import OURS, PASSES, DisagreementError
from .providers import ONNX_RUNTIME
from .timing import NOISY_SPREAD


def paired_table(rows: list, label: tuple, ours: tuple, theirs: tuple, digits: int, what_x: str) -> str:
    """The text table of rows timing ours against torch's side by side: label = (title, width,
    row -> text) columns first, then ours = (title, median key, minimum key) and theirs likewise,
    x, and a ! where the repeats disagree (row["noisy"])."""
    wo, wt = max(len(ours[0]), 10), max(len(theirs[0]), 10)
    lines = ["  " + " ".join(f"{t:{width}}" for t, width, _ in label)
             + f" {ours[0]:>{wo}} {'(min)':>9} {theirs[0]:>{wt}} {'(min)':>9} {'x':>6}"]
    for r in rows:
        lines.append("  " + " ".join(f"{fn(r):{width}}" for _, width, fn in label)
                     + f" {r[ours[1]]:{wo}.{digits}f} {r[ours[2]]:9.{digits}f} {r[theirs[1]]:{wt}.{digits}f}"
                     f" {r[theirs[2]]:9.{digits}f} {r['x']:6.2f}" + (" !" if r["noisy"] else ""))
    lines.append(f"  x = {what_x}; ! = the repeats disagree by more than {100 * NOISY_SPREAD:.0f}% (busy machine)")
    return "\n".join(lines)


def format_table(rows: list) -> str:
    lines = []
    key = lambda r: (tuple(r["shape"]), r["dtype"])  # noqa: E731
    for shape_dtype in dict.fromkeys(key(r) for r in rows):
        group = [r for r in rows if key(r) == shape_dtype]
        shape, dtype = shape_dtype
        path = next((r["path"] for r in group if r.get("path")), None)
        amp = group[0].get("autocast")
        dtype = f"{dtype} under autocast {amp}" if amp else dtype
        lines.append(f"\nshape (B, T, I, V, H) = {shape}, {dtype}" + (f"; torch ran {path}" if path else ""))
        width = max(26, 2 + max(len(r["provider"]) for r in group))
        lines.append(f"  {'provider':<{width}}{'inference ms':>13}{'x':>8}{'GF/s':>7}{'%ceil':>6}{'fwd+bwd ms':>12}{'x':>8}"
                     f"{'GF/s':>7}{'%ceil':>6}{'saved MB':>10}{'rel diff':>10}")

        def rate(r):
            if r.get("impossible_rate"):
                return f"{'n/a':>7}{'':>6}"
            if r.get("gemm_gflops") is None:
                return f"{'':>7}{'':>6}"
            frac = r.get("fraction_of_ceiling")
            return f"{r['gemm_gflops']:>7.1f}" + (f"{100 * frac:>5.0f}%" if frac is not None else f"{'':>6}")

        for name in dict.fromkeys(r["provider"] for r in group):
            f = next(r for r in group if r["provider"] == name and r["pass"] == "forward")
            b = next((r for r in group if r["provider"] == name and r["pass"] == "forward+backward"), None)
            mark = lambda r: "!" if r.get("noisy") else " "  # noqa: E731
            train = (f"{b['ms']:>11.3f}{mark(b)}{b['speedup_of_mmrnn_ext']:>7.2f}x{rate(b)}" if b is not None else
                     f"{'inference only':>33}")
            saved = f"{f['saved_activations_mb']:>10.1f}" if f["saved_activations_mb"] is not None else f"{'-':>10}"
            lines.append(f"  {name:<{width}}{f['ms']:>12.3f}{mark(f)}{f['speedup_of_mmrnn_ext']:>7.2f}x{rate(f)}{train}"
                         f"{saved}{f['relative_difference']:>10.1e}")
    lines.append("\n  inference = the forward under torch.no_grad; x = that provider's time / mmrnn_ext's time (above 1:\n"
                 "  mmrnn_ext is faster); GF/s = the pass's GEMM FLOPs (its own algorithm's) over its time: in fwd+bwd the\n"
                 "  forward's products, BPTT's, dW_hh and dW_ih (+ dW_img), about 3x the forward's (the input needs no\n"
                 "  gradient here); %ceil = that rate over the machine's big-GEMM rate; ! = that measurement's repeats\n"
                 "  disagree (see below)")
    note = noise_note(rows)
    if note:
        lines.append(note)
    return "\n".join(lines)


def format_recurrence(r: dict) -> str:
    if r.get("impossible_rate"):
        return (f"{r['recurrence_ms']:.2f} ms vs torch.mm {r['mm_ms']:.2f} ms: no rate reported (one exceeds the "
                f"machine's big-GEMM ceiling: the machine disturbed the timing; rerun on a quiet machine)")
    note = (f"  ! repeats disagree by {100 * r['spread']:.0f}% (busy machine?)" if r.get("noisy") else "")
    return (f"{r['recurrence_ms']:.2f} ms, {r['recurrence_gflops']:.1f} GF/s vs torch.mm {r['mm_gflops']:.1f} GF/s "
            f"({100 * r['fraction_of_mm']:.0f}%)" + note)


def noise_note(rows: list) -> str:
    """The table's warning when repeats disagreed or a rate was impossible ('' when none did)."""
    noisy = [r for r in rows if r.get("noisy")]
    if not noisy:
        return ""
    worst = max((r["spread"] or 0.0) for r in noisy)
    impossible = sum(1 for r in noisy if r.get("impossible_rate"))
    return (f"\n  ! {len(noisy)} of {len(rows)} measurements are unreliable: their repeats disagree by more than "
            f"{100 * NOISY_SPREAD:.0f}% (worst {100 * worst:.0f}%)" + (f", {impossible} gave a GEMM rate above the "
            f"machine's ceiling (shown as 'n/a')" if impossible else "") +
            ": the machine was busy; their ratios may be wrong — rerun on a quiet machine")


def markdown_table(result: dict) -> str:
    """The README table from a results JSON."""
    rows = result["rows"]
    providers = [p for p in dict.fromkeys(r["provider"] for r in rows) if p != OURS]
    head = ("| shape (B,T,I,V,H) | dtype | pass | mmrnn_ext ms (saved MB) | "
            + " | ".join(f"{p} ms (x, saved MB)" for p in providers) + " |")
    lines = [head, "|" + " --- |" * (4 + len(providers))]
    key = lambda r: (tuple(r["shape"]), r["dtype"], r["pass"])  # noqa: E731
    for k in dict.fromkeys(key(r) for r in rows):
        group = {r["provider"]: r for r in rows if key(r) == k}
        cells = []
        for p in providers:
            r = group.get(p)
            if r is None:
                cells.append("inference only" if p.startswith(ONNX_RUNTIME) else "skipped")
            elif r["saved_activations_mb"] is None:
                cells.append(f"{r['ms']:.2f} ({r['speedup_of_mmrnn_ext']:.2f}x)")
            else:
                cells.append(f"{r['ms']:.2f} ({r['speedup_of_mmrnn_ext']:.2f}x, {r['saved_activations_mb']:.1f})")
        ours = group[OURS]
        lines.append(f"| {','.join(map(str, k[0]))} | {k[1]} | {k[2]} | {ours['ms']:.2f} ({ours['saved_activations_mb']:.1f}) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = result["rows"]
    others = [p for p in dict.fromkeys(r["provider"] for r in rows) if p != OURS]
    labels = list(dict.fromkeys((tuple(r["shape"]), r["dtype"]) for r in rows))
    fig, axes = plt.subplots(2, 1, figsize=(min(18, max(8, 1.1 * len(labels) + 3)), 9), sharey=True)
    width = 0.8 / max(1, len(others))
    speedups = [r["speedup_of_mmrnn_ext"] for r in rows if r["provider"] != OURS] or [1.0]
    ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500)
             if min(speedups) / 2 <= t <= max(speedups) * 2]
    for ax, pass_name in zip(axes, PASSES):
        for i, p in enumerate(others):
            ys = []
            for shape, dtype in labels:
                r = next((r for r in rows if tuple(r["shape"]) == shape and r["dtype"] == dtype
                          and r["provider"] == p and r["pass"] == pass_name), None)
                ys.append(r["speedup_of_mmrnn_ext"] if r else 0)
            ax.bar([j + i * width for j in range(len(labels))], ys, width, label=p)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(axis="y", linewidth=0.3)
        ax.set_title(pass_name)
        ax.set_xticks([j + width * (len(others) - 1) / 2 for j in range(len(labels))])
        ax.set_xticklabels([f"{','.join(map(str, s[:3]))},\n{','.join(map(str, s[3:]))}\n{d}" for s, d in labels],
                           fontsize=7)
    axes[1].set_xlabel("shape (B,T,I,V,H), dtype")
    for ax in axes:
        ax.set_ylabel("provider time / mmrnn_ext's")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"mmrnn_ext speedup — {result['machine']['device']}, torch {result['machine']['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class _Progress:
    """A progress bar on stderr (tqdm when installed) when stderr is a terminal; nothing otherwise."""

    def __init__(self):
        self._n = self._total = 0
        self._quiet = not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
        try:
            from tqdm import tqdm

            # disable=None: no bar when stderr is not a terminal (a log file, CI)
            self._bar = tqdm(total=0, file=sys.stderr, desc="mmrnn-bench", leave=False, disable=None)
        except ImportError:
            self._bar = None

    def add_total(self, n):
        self._total += n
        if self._bar is not None:
            self._bar.total = self._total
            self._bar.refresh()

    def update(self, n):
        if self._bar is not None:
            self._bar.update(n)
        elif not self._quiet:
            self._n += n
            print(f"\rmmrnn-bench {self._n}/{self._total}", end="", file=sys.stderr, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()
        elif not self._quiet:
            print(file=sys.stderr)


def run_rows(header: str, rows_of, format_rows, json_path, payload: dict) -> int:
    """A mode with its own fixed cases (--decode, --train-step, --migrate): print the header, run
    rows_of() (a DisagreementError fails the run: no speed is reported), print format_rows(rows) and
    write {**payload, key: rows} to json_path, payload's "key" naming the rows."""
    print(header, flush=True)
    try:
        rows = rows_of()
    except DisagreementError as exc:
        print(f"mmrnn-bench: FAILED: {exc}", file=sys.stderr)
        return 1
    print(format_rows(rows))
    if json_path:
        data = {k: v for k, v in payload.items() if k != "key"}
        data[payload["key"]] = rows
        with open(json_path, "w") as f:
            json.dump(data, f, indent=1)
        print(f"\nwrote {json_path}")
    return 0
