"""Quick start: a multimodal RNN layer beside the stock way of doing the same with torch.nn.RNN.

The stock way concatenates the image features onto every input step and feeds nn.RNN; mmrnn_ext.RNN
takes the image separately and adds W_img v inside its fused recurrence. With the same weights the
two compute the same function; this prints the largest difference and each one's time.
"""
import torch

import mmrnn_ext
from mmrnn_ext.bench import time_ms

T, B, I, V, H = 128, 32, 128, 128, 256  # seq, batch, input, image features, hidden


def median_ms(fn):
    return time_ms(fn, torch.device("cpu"), repeats=7)


def main():
    torch.manual_seed(0)
    text = torch.randn(T, B, I)  # e.g. token embeddings
    image = torch.randn(B, V)  # e.g. pooled CNN features, one vector per sequence

    ours = mmrnn_ext.RNN(I, H, image_size=V)
    stock = torch.nn.RNN(I + V, H)
    with torch.no_grad():  # give the stock RNN the same weights: [W_ih | W_img]
        stock.weight_ih_l0.copy_(torch.cat([ours.weight_ih_l0, ours.weight_img_l0], dim=1))
        stock.weight_hh_l0.copy_(ours.weight_hh_l0)
        stock.bias_ih_l0.copy_(ours.bias_ih_l0)
        stock.bias_hh_l0.copy_(ours.bias_hh_l0)

    def run_ours():
        return ours(text, image=image)

    def run_stock():
        return stock(torch.cat([text, image.expand(T, B, V)], dim=-1))

    with torch.no_grad():
        out_a, h_a = run_ours()
        out_b, h_b = run_stock()
        diff = max((out_a - out_b).abs().max().item(), (h_a - h_b).abs().max().item())
        t_ours, t_stock = median_ms(run_ours), median_ms(run_stock)

    def train_step(fn):
        def step():
            out, h = fn()
            (out.sum() + h.sum()).backward()
        return step

    tt_ours, tt_stock = median_ms(train_step(run_ours)), median_ms(train_step(run_stock))
    backend = mmrnn_ext.backend_for(text)
    print(f"shape (seq, batch, input, image, hidden) = {(T, B, I, V, H)}, float32, CPU, auto backend -> {backend}")
    print(f"max |mmrnn_ext.RNN - nn.RNN on concatenated input| = {diff:.2e}")
    print(f"forward          mmrnn_ext.RNN {t_ours:8.2f} ms   nn.RNN(concat) {t_stock:8.2f} ms   ({t_stock / t_ours:.2f}x)")
    print(f"forward+backward mmrnn_ext.RNN {tt_ours:8.2f} ms   nn.RNN(concat) {tt_stock:8.2f} ms   ({tt_stock / tt_ours:.2f}x)")
    if diff > 1e-4:
        raise SystemExit(f"results differ by {diff:.2e}: expected agreement to float32 rounding")


if __name__ == "__main__":
    main()
