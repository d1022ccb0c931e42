"""An attention captioning decoder ("show, attend and tell") trained with teacher forcing on
mmrnn_ext.LSTMCell — the attention context enters the cell as its image — beside the same decoder on
nn.LSTMCell over torch.cat([word embedding, context]), with the same weights, on random data:

    python examples/attention_captioning.py            B=32, 20 steps, 196 regions of 2048 features
    python examples/attention_captioning.py --small    a small decoder (seconds)

Each iteration: forward over the caption (the batch shrinking as captions end), backward, one Adam
step. It prints both losses (equal within float32 rounding) and each decoder's time per iteration.
The decoder is mmrnn_ext.models.AttentionDecoder; one step of its cell is

    h, c = cell(embedding_t, (h[:b], c[:b]), image=context_t)      # mmrnn_ext.LSTMCell(E, H, image_size=F)
"""
import argparse
import statistics
import time

import torch

from mmrnn_ext.models import AttentionDecoder


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="B=8, 10 steps, 16 regions of 64 features, hidden 64")
    ap.add_argument("--iterations", type=int, default=3)
    args = ap.parse_args()
    B, steps, R, F_, E, H, vocab = (8, 10, 16, 64, 32, 64, 500) if args.small else (32, 20, 196, 2048, 512, 512, 1000)
    torch.manual_seed(0)
    stock = AttentionDecoder(vocab, embed=E, hidden=H, features=F_, attention=min(512, H), cell="torch")
    ours = AttentionDecoder(vocab, embed=E, hidden=H, features=F_, attention=min(512, H), cell="mmrnn_ext")
    ours.copy_from(stock)
    regions = torch.randn(B, R, F_)
    captions = torch.randint(0, vocab, (B, steps + 1))
    lengths = torch.sort(torch.randint(1, steps + 1, (B,)), descending=True).values
    lengths[0] = steps
    opts = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in (("mmrnn_ext", ours), ("torch", stock))}
    times = {"mmrnn_ext": [], "torch": []}
    print(f"attention decoder: B={B}, {steps} steps (batch shrinking to {int((lengths >= steps).sum())}), "
          f"{R} regions x {F_} features, embed {E}, hidden {H}, {torch.get_num_threads()} threads")
    for it in range(args.iterations):
        losses = {}
        for name, model in (("mmrnn_ext", ours), ("torch", stock)):  # turns: a slow spell hits both
            start = time.perf_counter()
            opts[name].zero_grad()
            loss = model(regions, captions, lengths)
            loss.backward()
            opts[name].step()
            times[name].append(time.perf_counter() - start)
            losses[name] = loss.item()
        print(f"iteration {it}: loss mmrnn_ext {losses['mmrnn_ext']:.6f}  nn.LSTMCell {losses['torch']:.6f}  "
              f"(difference {abs(losses['mmrnn_ext'] - losses['torch']):.1e})")
    o, s = statistics.median(times["mmrnn_ext"]), statistics.median(times["torch"])
    print(f"time per iteration (median): mmrnn_ext.LSTMCell {o * 1e3:.1f} ms, nn.LSTMCell(concat) {s * 1e3:.1f} ms "
          f"({s / o:.2f}x)")


if __name__ == "__main__":
    main()
