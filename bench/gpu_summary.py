"""The GPU issue's targets from the two bench JSONs that bench/gpu_check.sh writes:

    python3 bench/gpu_summary.py DIR     (DIR holds bench_default.json and bench_tf32_off.json)

bf16: >= 5x PyTorch's bf16 nn.RNN and >= 1.0x cuDNN fp16; fp32: >= 1.0x cuDNN fp32 at the same TF32
setting; batch 1 (1,1024,64,64,256): <= 1.5 us per step, bf16 forward. Every cell as measured."""
import json
import os
import sys


def _ms(rows, shape, dtype, provider, pass_name):
    for r in rows:
        if tuple(r["shape"]) == shape and r["dtype"] == dtype and r["provider"] == provider and r["pass"] == pass_name:
            return r["ms"]
    return None


def summarize(directory):
    lines = []
    with open(os.path.join(directory, "bench_default.json")) as f:
        default = json.load(f)
    off_path = os.path.join(directory, "bench_tf32_off.json")
    off = json.load(open(off_path)) if os.path.exists(off_path) else None
    rows = default["rows"]
    lines.append(f"device: {default['machine']['device']}; torch {default['machine']['torch']}, "
                 f"triton {default['machine'].get('triton')}, cuDNN {default['machine'].get('cudnn')}")
    shapes = list(dict.fromkeys(tuple(r["shape"]) for r in rows))
    lines.append("| shape | pass | bf16 ours ms | vs PyTorch bf16 (>=5x) | vs cuDNN fp16 (>=1x) | fp32 ours ms (TF32 default) | vs cuDNN fp32 (>=1x) | fp32 ours ms (TF32 off) | vs cuDNN fp32 TF32 off (>=1x) |")
    lines.append("|" + " --- |" * 9)

    def ratio(a, b):
        return f"{b / a:.2f}x" if a and b else "n/a"

    for shape in shapes:
        for p in ("forward", "forward+backward"):
            bf = _ms(rows, shape, "bfloat16", "mmrnn_ext", p)
            torch_bf = _ms(rows, shape, "bfloat16", "nn.RNN(concat)", p)
            cudnn_h = _ms(rows, shape, "float16", "nn.RNN(concat)", p)
            f32 = _ms(rows, shape, "float32", "mmrnn_ext", p)
            cudnn_f = _ms(rows, shape, "float32", "nn.RNN(concat)", p)
            f32_off = _ms(off["rows"], shape, "float32", "mmrnn_ext", p) if off else None
            cudnn_off = _ms(off["rows"], shape, "float32", "nn.RNN(concat)", p) if off else None
            fmt = lambda v: f"{v:.3f}" if v else "n/a"  # noqa: E731
            lines.append(f"| {','.join(map(str, shape))} | {p} | {fmt(bf)} | {ratio(bf, torch_bf)} | {ratio(bf, cudnn_h)} | "
                         f"{fmt(f32)} | {ratio(f32, cudnn_f)} | {fmt(f32_off)} | {ratio(f32_off, cudnn_off)} |")
    b1 = _ms(rows, (1, 1024, 64, 64, 256), "bfloat16", "mmrnn_ext", "forward")
    if b1:
        lines.append(f"\nbatch 1 (1,1024,64,64,256) bf16 forward: {1000 * b1 / 1024:.2f} us per step (target <= 1.5)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(sys.argv[1] if len(sys.argv) > 1 else "."))
