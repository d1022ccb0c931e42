"""Quick start: multimodal RNN, LSTM and GRU layers beside the stock way of doing the same with torch.nn.

The stock way concatenates the image features onto every input step and feeds nn.RNN / nn.LSTM /
nn.GRU; mmrnn_ext's layers take the image separately and add W_img v inside their fused recurrence.
With the same weights the two compute the same function; this prints the largest difference and
each one's time, per cell.
"""
import torch

import mmrnn_ext
from mmrnn_ext.bench import time_ms

T, B, I, V, H = 128, 32, 128, 128, 256  # seq, batch, input, image features, hidden
CELLS = [(mmrnn_ext.RNN, torch.nn.RNN), (mmrnn_ext.LSTM, torch.nn.LSTM), (mmrnn_ext.GRU, torch.nn.GRU)]


def median_ms(fn):
    return time_ms(fn, torch.device("cpu"), repeats=7)


def states(h):
    return h if isinstance(h, tuple) else (h,)


def compare(ours_cls, stock_cls, text, image):
    torch.manual_seed(0)
    ours = ours_cls(I, H, image_size=V)
    stock = stock_cls(I + V, H)
    with torch.no_grad():  # give the stock layer the same weights: W_ih of [W_ih | W_img]
        for name, p in stock.named_parameters():
            src = getattr(ours, name)
            p.copy_(torch.cat([src, ours.weight_img_l0], dim=1) if name == "weight_ih_l0" else src)

    def run_ours():
        return ours(text, image=image)

    def run_stock():
        return stock(torch.cat([text, image.expand(T, B, V)], dim=-1))

    with torch.no_grad():
        (out_a, h_a), (out_b, h_b) = run_ours(), run_stock()
        diff = max([(out_a - out_b).abs().max().item()] +
                   [(a - b).abs().max().item() for a, b in zip(states(h_a), states(h_b))])
        t_ours, t_stock = median_ms(run_ours), median_ms(run_stock)

    def train_step(fn):
        def step():
            out, h = fn()
            (out.sum() + sum(s.sum() for s in states(h))).backward()
        return step

    tt_ours, tt_stock = median_ms(train_step(run_ours)), median_ms(train_step(run_stock))
    ours_name, stock_name = f"mmrnn_ext.{ours_cls.__name__}", f"nn.{stock_cls.__name__}(concat)"
    print(f"\nmax |{ours_name} - {stock_name}| = {diff:.2e}")
    print(f"forward          {ours_name:<15} {t_ours:8.2f} ms   {stock_name:<16} {t_stock:8.2f} ms   ({t_stock / t_ours:.2f}x)")
    print(f"forward+backward {ours_name:<15} {tt_ours:8.2f} ms   {stock_name:<16} {tt_stock:8.2f} ms   ({tt_stock / tt_ours:.2f}x)")
    return diff


def main():
    torch.manual_seed(0)
    text = torch.randn(T, B, I)  # e.g. token embeddings
    image = torch.randn(B, V)  # e.g. pooled CNN features, one vector per sequence
    backend = mmrnn_ext.backend_for(text)
    print(f"shape (seq, batch, input, image, hidden) = {(T, B, I, V, H)}, float32, CPU, auto backend -> {backend}")
    worst = max(compare(ours, stock, text, image) for ours, stock in CELLS)
    if worst > 1e-4:
        raise SystemExit(f"results differ by {worst:.2e}: expected agreement to float32 rounding")


if __name__ == "__main__":
    main()
