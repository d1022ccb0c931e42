"""Regenerate the README's CPU performance section from the committed results JSON:

    python bench/update_readme.py [bench/results/cpu.json]

Replaces what stands between <!-- cpu-table:start --> and <!-- cpu-table:end --> with the machine,
the table (mmrnn-bench --markdown) and the recurrence-vs-torch.mm figures, then the plot."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mmrnn_ext.bench import markdown_table  # noqa: E402

START, END = "<!-- cpu-table:start -->", "<!-- cpu-table:end -->"


def section(result: dict, json_rel: str, png_rel: str) -> str:
    m = result["machine"]
    lines = [f"Measured on {m['device']}, {m['cpu_cores']} cores ({m['torch_threads']} torch threads), "
             f"torch {m['torch']}, {m['date'][:10]}; float32, one layer, unidirectional; median of "
             f"5 runs after a warm-up. Source: `{json_rel}` (regenerate: `mmrnn-bench --all-backends "
             f"--json {json_rel} --plot {png_rel}`, then `python bench/update_readme.py`).", "",
             markdown_table(result), ""]
    if result.get("recurrence"):
        lines.append("The recurrence alone (forward) against T calls of torch.mm on the same [B,H]×[H,H] GEMM:")
        lines.append("")
        lines.append("| shape (B,T,I,V,H) | backend | recurrence GF/s | torch.mm GF/s | fraction |")
        lines.append("| --- | --- | --- | --- | --- |")
        for r in result["recurrence"]:
            lines.append(f"| {','.join(map(str, r['shape']))} | {r['backend']} | {r['recurrence_gflops']:.1f} | "
                         f"{r['mm_gflops']:.1f} | {100 * r['fraction_of_mm']:.0f}% |")
        lines.append("")
    lines.append(f"![CPU speedups]({png_rel})")
    return "\n".join(lines)


def main():
    json_path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "bench", "results", "cpu.json")
    with open(json_path) as f:
        result = json.load(f)
    rel = os.path.relpath(json_path, ROOT)
    readme_path = os.path.join(ROOT, "README.md")
    with open(readme_path) as f:
        text = f.read()
    head, rest = text.split(START)
    _, tail = rest.split(END)
    new = section(result, rel, os.path.splitext(rel)[0] + ".png")
    with open(readme_path, "w") as f:
        f.write(head + START + "\n" + new + "\n" + END + tail)


if __name__ == "__main__":
    main()
