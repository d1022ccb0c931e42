"""The C++ recurrence engine (csrc/engine.h): every vector path forced on this machine
(MMRNN_CPU_ISA), both tile shapes, odd sizes, the inference forwards (nothing saved, the same
numbers as the training forward), one or two threads per call giving the same bits, and calls from
several Python threads at once giving the serial results bit for bit."""
import copy
import threading

import pytest
import torch

import mmrnn_ext
from mmrnn_ext.modules.base import RecurrentBase
from conftest import assert_close, require
from op_cases import compare_with_reference
from test_gated_ops import compare as compare_gated
from test_gated_ops import make_inputs as make_gated_inputs

ORDER = ["generic", "avx2", "avx512", "avx512_bf16"]


@pytest.fixture(autouse=True)
def _cpp():
    require("cpp")


def _force(monkeypatch, isa):
    """Caps the engine at `isa`; skips when this CPU cannot run it (a cap never raises the path)."""
    from mmrnn_ext import _C

    monkeypatch.delenv("MMRNN_CPU_ISA", raising=False)
    detected = _C.cpu_isa()
    if ORDER.index(isa) > ORDER.index(detected):
        pytest.skip(f"this CPU runs {detected}, not {isa}")
    monkeypatch.setenv("MMRNN_CPU_ISA", isa)
    assert _C.cpu_isa() == isa


# (T, B, H): B = 1; B a tile's rows; B over 12 (the six-row tile for four gates); H not a multiple
# of any vector width; H below one panel; H spanning several panels
SIZES = [(5, 1, 7), (3, 12, 33), (4, 13, 65), (2, 17, 16), (3, 3, 1)]
IDS = [f"T{t}-B{b}-H{h}" for t, b, h in SIZES]


@pytest.mark.parametrize("isa", ORDER)
@pytest.mark.parametrize("T,B,H", SIZES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_rnn_every_path(monkeypatch, isa, T, B, H, dtype):
    _force(monkeypatch, isa)
    for nl in ("tanh", "relu"):
        compare_with_reference("cpp", T, B, H, "step", dtype, nl, lengths=True)
    compare_with_reference("cpp", T, B, H, "static", dtype, "tanh", lengths=False, noncontig=True)


@pytest.mark.parametrize("isa", ORDER)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("T,B,H", SIZES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_gated_every_path(monkeypatch, isa, cell, T, B, H, dtype):
    _force(monkeypatch, isa)
    compare_gated(cell, "cpp", T, B, H, "step", dtype, lengths=True)
    compare_gated(cell, "cpp", T, B, H, "static", dtype, lengths=False, noncontig=True)


# Weights larger than a thread's L2 (512 KB as the engine plans it, with two threads): the forward
# and BPTT products then prefetch each thread's next panel and walk the panels in alternating
# directions step by step (run_steps, csrc/engine.h). Float32 LSTM W_hh at H = 300 is 1.4 MB,
# GRU 1.1 MB, the RNN's at H = 520 1.1 MB; float64 twice that. B = 7 and 13: two row blocks or more
# (the prefetch's condition) on every path.
@pytest.mark.parametrize("isa", ORDER)
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_streamed_weights_every_path(monkeypatch, isa, cell, dtype):
    _force(monkeypatch, isa)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        if cell == "rnn":
            compare_with_reference("cpp", 5, 7, 520, "step", dtype, "tanh", lengths=True)
        else:
            compare_gated(cell, "cpp", 5, 7, 300, "step", dtype, lengths=True)
            compare_gated(cell, "cpp", 4, 13, 300, "static", dtype)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("isa", ORDER)
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (7, 3, 65), (13, 33, 17), (97, 12, 64), (50, 128, 130)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_linear_every_path(monkeypatch, isa, M, K, N, dtype):
    """The engine's input product against torch's, leading dimensions kept."""
    from mmrnn_ext import _C

    _force(monkeypatch, isa)
    g = torch.Generator().manual_seed(M * K + N)
    x = torch.randn(2, M, K, generator=g, dtype=torch.float64)
    w = torch.randn(N, K, generator=g, dtype=torch.float64) / K ** 0.5
    out = _C.linear(x.to(dtype), w.to(dtype))
    assert out.shape == (2, M, N) and out.dtype == dtype
    assert_close(out, torch.nn.functional.linear(x, w).to(dtype), dtype, "linear")


@pytest.mark.parametrize("isa", ORDER)
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (7, 65, 3), (13, 17, 33), (50, 130, 128)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_linear_untransposed_every_path(monkeypatch, isa, M, K, N, dtype):
    """transpose_w=False: x [..., K] @ w [K, N] (the input gradient dA @ W_ih) against torch's."""
    from mmrnn_ext import _C

    _force(monkeypatch, isa)
    g = torch.Generator().manual_seed(M * K + N + 1)
    x = torch.randn(3, M, K, generator=g, dtype=torch.float64)
    w = torch.randn(K, N, generator=g, dtype=torch.float64) / K ** 0.5
    out = _C.linear(x.to(dtype), w.to(dtype), False)
    assert out.shape == (3, M, N) and out.dtype == dtype
    assert_close(out, x.matmul(w).to(dtype), dtype, "linear, w untransposed")


def test_linear_edges():
    from mmrnn_ext import _C

    assert _C.linear(torch.randn(3, 0), torch.randn(5, 0)).eq(0).all()
    assert _C.linear(torch.randn(0, 4), torch.randn(5, 4)).shape == (0, 5)
    with pytest.raises(RuntimeError, match=r"w: expected shape \[N, 4\]"):
        _C.linear(torch.randn(3, 4), torch.randn(5, 3))
    with pytest.raises(RuntimeError, match=r"w: expected shape \[4, N\]"):
        _C.linear(torch.randn(3, 4), torch.randn(5, 4), False)
    with pytest.raises(RuntimeError, match="x: expected a float32, float64 or bfloat16 CPU tensor"):
        _C.linear(torch.randn(3, 4).half(), torch.randn(5, 4).half())


def _weight_grad_reference(dA, x, h0, out):
    """(sum_t dA_t^T x_t, sum_t dA_t^T h_{t-1}) in float64 on torch's products."""
    T, B, M = dA.shape
    a = dA.double().reshape(T * B, M).t()
    dw_x = None if x is None else a.mm(x.double().reshape(T * B, -1))
    dw_h = None
    if out is not None:
        h_prev = torch.cat([h0.double().unsqueeze(0), out.double()[:-1]]).reshape(T * B, -1)
        dw_h = a.mm(h_prev)
    return dw_x, dw_h


# (T, B, I, M, H): single values; M not a multiple of the tile's 6 rows; I and H not multiples of
# any vector width (the padded last columns), below one vector, over one panel; K = T * B over
# several of the kernel's chunks of rows (128 at least), with the h0 / out boundary inside a chunk
WGRAD_SIZES = [(1, 1, 1, 1, 1), (3, 1, 5, 7, 3), (7, 3, 17, 65, 33), (5, 13, 70, 97, 40), (2, 5, 200, 30, 19),
               (100, 3, 500, 13, 300)]


@pytest.mark.parametrize("isa", ORDER)
@pytest.mark.parametrize("T,B,I,M,H", WGRAD_SIZES, ids=[f"T{t}-B{b}-I{i}-M{m}-H{h}" for t, b, i, m, h in WGRAD_SIZES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_weight_grad_every_path(monkeypatch, isa, T, B, I, M, H, dtype):
    """The engine's weight gradients (dW_ih and dW_hh in one pass over dA) against torch's products
    in float64: both at once, each alone (the chunks of K follow the row width, so the bits may
    differ from the joint pass's), and dA as a column slice of a wider tensor (the GRU's), read in
    place."""
    from mmrnn_ext import _C

    _force(monkeypatch, isa)
    g = torch.Generator().manual_seed(T * B + I + M + H)
    # dA scaled so that the sums over K = T * B rows are O(1), as the fp32 tolerance assumes
    dA, x, h0, out = (torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
                      for shape in ((T, B, M), (T, B, I), (B, H), (T, B, H)))
    dA = dA / (T * B) ** 0.5
    ref_x, ref_h = _weight_grad_reference(dA, x, h0, out)
    ref_x_plain = ref_x
    dw_x, dw_h = _C.weight_grad(dA, x, h0, out)
    assert dw_x.shape == (M, I) and dw_h.shape == (M, H) and dw_x.dtype == dw_h.dtype == dtype
    assert_close(dw_x, ref_x.to(dtype), dtype, "dW_x")
    assert_close(dw_h, ref_h.to(dtype), dtype, "dW_h")
    only_x, none = _C.weight_grad(dA, x, None, None)
    assert none is None
    assert_close(only_x, ref_x.to(dtype), dtype, "dW_x alone")
    none, only_h = _C.weight_grad(dA, None, h0, out)
    assert none is None
    assert_close(only_h, ref_h.to(dtype), dtype, "dW_h alone")
    wide = (torch.randn(T, B, M + 5, generator=g, dtype=torch.float64) / (T * B) ** 0.5).to(dtype)
    sliced = wide[..., 2:M + 2]
    ref_x, ref_h = _weight_grad_reference(sliced, x, h0, out)
    dw_x, dw_h = _C.weight_grad(sliced, x, h0, out)
    assert_close(dw_x, ref_x.to(dtype), dtype, "dW_x of a column slice")
    assert_close(dw_h, ref_h.to(dtype), dtype, "dW_h of a column slice")
    # dW_h's last R rows from a tail (the GRU's n rows), R of every size up to M (row blocks cut
    # where the tail begins, mid-tile or not); the tail a column slice too
    for R in sorted({1, M // 3, M - 1, M} - {0}):
        tail = (torch.randn(T, B, R + 3, generator=g, dtype=torch.float64) / (T * B) ** 0.5).to(dtype)[..., 1:R + 1]
        ref_tail = _weight_grad_reference(torch.cat([dA[..., :M - R], tail], 2), None, h0, out)[1]
        dw_x, dw_h = _C.weight_grad(dA, x, h0, out, tail)
        assert_close(dw_x, ref_x_plain.to(dtype), dtype, f"dW_x beside a tail of {R} rows")
        assert_close(dw_h, ref_tail.to(dtype), dtype, f"dW_h with a tail of {R} rows")


def test_weight_grad_threads_same_bits():
    """A thread owns whole row blocks of dW and adds the chunks of K in order: 1, 2 or 3 threads give
    the same bits (with a tail of 33 rows for dW_h: blocks cut mid-tile)."""
    from mmrnn_ext import _C

    g = torch.Generator().manual_seed(3)
    args = (torch.randn(60, 7, 97, generator=g), torch.randn(60, 7, 130, generator=g), torch.randn(7, 300, generator=g),
            torch.randn(60, 7, 300, generator=g), torch.randn(60, 7, 33, generator=g))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _C.weight_grad(*args)
        for n in (2, 3):
            torch.set_num_threads(n)
            for a, b in zip(one, _C.weight_grad(*args)):
                assert torch.equal(a, b), f"{n} threads"
    finally:
        torch.set_num_threads(threads)


# (B, V, G, inner): single values; G not a multiple of any vector width, over one panel; the GRU's
# inner third (b_hn); no image columns
OUTER_SIZES = [(1, 1, 1, 0), (3, 5, 7, 0), (7, 17, 65, 0), (13, 6, 99, 33), (2, 64, 300, 100), (5, 0, 9, 3)]


@pytest.mark.parametrize("isa", ORDER)
@pytest.mark.parametrize("B,V,G,inner", OUTER_SIZES, ids=[f"B{b}-V{v}-G{g}-in{i}" for b, v, g, i in OUTER_SIZES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_outer_term_and_grad_every_path(monkeypatch, isa, B, V, G, inner, dtype):
    """The outer term image @ W_img^T + b_ih + b_hh (b_hh's last `inner` entries left out: the GRU's
    b_hn) and its inputs' gradients from the step sums S [B, G + inner] against torch's float64
    products: with and without image, with and without biases."""
    from mmrnn_ext import _C

    _force(monkeypatch, isa)
    g = torch.Generator().manual_seed(B * V + G + inner)
    img, w_img, b_ih, b_hh, S = (torch.randn(*shape, generator=g, dtype=torch.float64)
                                 for shape in ((B, V), (G, V), (G,), (G,), (B, G + inner)))
    bias = b_ih + torch.cat([b_hh[:G - inner], b_hh.new_zeros(inner)])
    c = lambda t: t.to(dtype)  # noqa: E731
    assert_close(_C.outer_term(c(img), c(w_img), c(b_ih), c(b_hh), inner, B), c(img @ w_img.T + bias), dtype,
                 "image and biases")
    assert_close(_C.outer_term(c(img), c(w_img), None, None, inner, B), c(img @ w_img.T), dtype, "image alone")
    alone = _C.outer_term(None, None, c(b_ih), c(b_hh), inner, B)
    assert alone.shape == (B, G) and alone.is_contiguous()
    assert_close(alone, c(bias.expand(B, G)), dtype, "biases alone")
    assert _C.outer_term(None, None, None, None, inner, B) is None
    d_w, d_bi, d_bh = _C.outer_grad(c(S), c(img), inner, True)
    assert_close(d_w, c(S[:, :G].T @ img), dtype, "dW_img")
    col = S.sum(0)
    assert_close(d_bi, c(col[:G]), dtype, "d_b_ih")
    assert_close(d_bh, c(torch.cat([col[:G - inner], col[G:]])), dtype, "d_b_hh")
    none_w, d_bi2, _ = _C.outer_grad(c(S), None, inner, True)
    assert none_w is None and torch.equal(d_bi2, d_bi)
    d_w2, none_bi, none_bh = _C.outer_grad(c(S), c(img), inner, False)
    assert none_bi is None and none_bh is None and torch.equal(d_w2, d_w)


def test_outer_term_and_grad_bad_input():
    from mmrnn_ext import _C

    v, w, b = torch.randn(3, 4), torch.randn(6, 4), torch.randn(6)
    with pytest.raises(RuntimeError, match="image and w_img: expected both or neither, got image only"):
        _C.outer_term(v, None, b, b, 0, 3)
    with pytest.raises(RuntimeError, match="b_ih and b_hh: expected both or neither, got b_hh only"):
        _C.outer_term(v, w, None, b, 0, 3)
    with pytest.raises(RuntimeError, match=r"image: expected shape \[3, 5\], got \[3, 4\]"):
        _C.outer_term(v, torch.randn(6, 5), b, b, 0, 3)
    with pytest.raises(RuntimeError, match=r"image: expected a 2-D tensor \[B, V\] \(static\)"):
        _C.outer_term(torch.randn(2, 3, 4), w, b, b, 0, 3)
    with pytest.raises(RuntimeError, match=r"b_ih: expected shape \[6\], got \[5\]"):
        _C.outer_term(v, w, torch.randn(5), b, 0, 3)
    with pytest.raises(RuntimeError, match=r"b_hh: expected dtype Float \(that of w_img\), got Double"):
        _C.outer_term(v, w, b, b.double(), 0, 3)
    with pytest.raises(RuntimeError, match="batch: expected 3 \\(the image's rows\\), got 2"):
        _C.outer_term(v, w, b, b, 0, 2)
    with pytest.raises(RuntimeError, match="batch: expected a row count >= 0, got -1"):
        _C.outer_term(None, None, b, b, 0, -1)
    with pytest.raises(RuntimeError, match=r"inner: expected a count in \[0, 6\], got 7"):
        _C.outer_term(None, None, b, b, 7, 3)
    with pytest.raises(RuntimeError, match="w_img: expected a float32 or float64 CPU tensor, got BFloat16"):
        _C.outer_term(v.bfloat16(), w.bfloat16(), None, None, 0, 3)
    with pytest.raises(RuntimeError, match=r"S: expected a contiguous 2-D tensor \[B, W\]"):
        _C.outer_grad(torch.randn(3, 12)[:, :6], v, 0, True)
    with pytest.raises(RuntimeError, match=r"inner: expected a count in \[0, 3\] \(S's width 6 = G \+ inner\), got 4"):
        _C.outer_grad(torch.randn(3, 6), None, 4, True)
    with pytest.raises(RuntimeError, match=r"image: expected shape \[3, 4\], got \[2, 4\]"):
        _C.outer_grad(torch.randn(3, 6), torch.randn(2, 4), 0, True)


def test_weight_grad_edges_and_bad_input():
    from mmrnn_ext import _C

    dw_x, dw_h = _C.weight_grad(torch.randn(0, 3, 5), torch.randn(0, 3, 4), torch.randn(3, 2), torch.randn(0, 3, 2))
    assert dw_x.shape == (5, 4) and dw_h.shape == (5, 2) and dw_x.eq(0).all() and dw_h.eq(0).all()
    assert _C.weight_grad(torch.randn(2, 3, 0), torch.randn(2, 3, 4), None, None)[0].shape == (0, 4)
    with pytest.raises(RuntimeError, match="dA: expected a float32 or float64 CPU tensor, got BFloat16"):
        _C.weight_grad(torch.randn(2, 3, 5).bfloat16(), None, None, None)
    with pytest.raises(RuntimeError, match=r"dA: expected a 3-D tensor \[T, B, M\]"):
        _C.weight_grad(torch.randn(6, 5), None, None, None)
    with pytest.raises(RuntimeError, match="h0 and out: expected both"):
        _C.weight_grad(torch.randn(2, 3, 5), None, torch.randn(3, 4), None)
    with pytest.raises(RuntimeError, match=r"x: expected shape \[2, 3, I\]"):
        _C.weight_grad(torch.randn(2, 3, 5), torch.randn(2, 4, 4), None, None)
    with pytest.raises(RuntimeError, match=r"h0: expected shape \[3, 4\]"):
        _C.weight_grad(torch.randn(2, 3, 5), None, torch.randn(3, 5), torch.randn(2, 3, 4))
    with pytest.raises(RuntimeError, match="x: expected dtype Double"):
        _C.weight_grad(torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 4), None, None)
    with pytest.raises(RuntimeError, match="tail: expected only with h0 and out"):
        _C.weight_grad(torch.randn(2, 3, 5), torch.randn(2, 3, 4), None, None, torch.randn(2, 3, 2))
    with pytest.raises(RuntimeError, match=r"tail: expected shape \[2, 3, R\] with R <= 5, got \[2, 3, 6\]"):
        _C.weight_grad(torch.randn(2, 3, 5), None, torch.randn(3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 6))
    with pytest.raises(RuntimeError, match="tail: expected a CPU tensor of Float"):
        _C.weight_grad(torch.randn(2, 3, 5), None, torch.randn(3, 4), torch.randn(2, 3, 4),
                       torch.randn(2, 3, 2, dtype=torch.float64))


@pytest.mark.parametrize("cell,kw,fused", [("rnn", {}, True), ("rnn", {"nonlinearity": "relu"}, True),
                                           ("lstm", {}, True), ("lstm", {"proj_size": 5}, False), ("gru", {}, True),
                                           ("gru", {"bias": False}, True)],
                         ids=["rnn", "rnn-relu", "lstm", "lstm-proj", "gru", "gru-no-bias"])
def test_modules_inference_paths(monkeypatch, cell, kw, fused):
    """Without gradients (float32, cpp) the RNN and LSTM run the input product inside the recurrence
    (the infer kernels given x and W_ih); the GRU (whose reset gate multiplies only the recurrent
    product) and the LSTM with proj_size take the engine's input product, then their recurrence.
    With gradients (float32; the fused training forward switched off here, so that inference is
    checked against the separate product — test_training_input_product_on_the_engine covers it)
    every cell takes the engine's input product, then its differentiable recurrence; float64 takes
    torch's product; every path agrees with the differentiable forward."""
    from mmrnn_ext import _C

    monkeypatch.setattr(RecurrentBase, "FUSE_TRAINING_PRODUCT", False)

    calls = {"linear": 0, "fused": 0}
    real_linear, infer_name = _C.linear, f"{cell}_infer"
    real_infer = getattr(_C, infer_name)

    def linear(*a):
        calls["linear"] += 1
        return real_linear(*a)

    def infer(*a):
        calls["fused"] += a[1] is not None  # the w_ih argument: the fused form
        return real_infer(*a)

    monkeypatch.setattr(_C, "linear", linear)
    monkeypatch.setattr(_C, infer_name, infer)
    m = _module(cell, **kw)
    x, img = torch.randn(6, 3, 12), torch.randn(6, 3, 6)
    lengths = torch.tensor([6, 2, 4])
    ref = _flat(m(x, image=img, lengths=lengths))
    assert calls == {"linear": 4, "fused": 0}  # 2 layers x 2 directions, with gradients
    with torch.no_grad():
        got = _flat(m(x, image=img, lengths=lengths))
    assert calls == ({"linear": 4, "fused": 4} if fused else {"linear": 8, "fused": 0})
    for a, b in zip(ref, got):
        assert_close(b, a.detach(), torch.float32, "inference")
    m.double()
    with torch.no_grad():
        m(x.double(), image=img.double(), lengths=lengths)
    assert calls == ({"linear": 4, "fused": 4} if fused else {"linear": 8, "fused": 0})  # float64: torch's product


@pytest.mark.parametrize("isa", ORDER)
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("T,B,I,H", [(5, 1, 3, 7), (4, 13, 17, 33), (3, 12, 1, 65)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_fused_inference_kernels(monkeypatch, isa, cell, T, B, I, H, dtype):
    """The fused-input inference kernels, and the LSTM's and GRU's fused training forwards (what
    they save for BPTT too: the LSTM's c at every step and gate activations, the GRU's r, z, n and
    W_hn h + b_hn — its tiles keep W_in x_t apart), against the reference on x @ W_ih^T, every path,
    with lengths and a per-step image term. (The RNN's training forward is its infer kernel.)"""
    from mmrnn_ext import _C
    from mmrnn_ext.reference import (gru_recurrence_ref, gru_reference_forward, lstm_recurrence_ref,
                                     lstm_reference_forward, rnn_recurrence_ref)

    _force(monkeypatch, isa)
    G = {"rnn": 1, "lstm": 4, "gru": 3}[cell]
    g = torch.Generator().manual_seed(T * B + H)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale)  # noqa: E731
    x, w_ih, w_hh = rnd(T, B, I), rnd(G * H, I, scale=I ** -0.5), rnd(G * H, H, scale=H ** -0.5)
    img, h0, c0 = rnd(T, B, G * H), rnd(B, H, scale=0.5), rnd(B, H, scale=0.5)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    xp = torch.nn.functional.linear(x, w_ih)
    cast = lambda t: t.to(dtype)  # noqa: E731
    if cell == "rnn":
        got = _C.rnn_infer(cast(x), cast(w_ih), cast(w_hh), cast(h0), cast(img), lengths, False)
        ref = rnn_recurrence_ref(xp, w_hh, h0, img, lengths)
    elif cell == "gru":
        b_hn = rnd(H, scale=0.5)
        got = _C.gru_infer(cast(x), cast(w_ih), cast(w_hh), cast(b_hn), cast(h0), cast(img), lengths)
        ref = gru_recurrence_ref(xp, w_hh, h0, img, lengths, b_hn)
        saved = _C.gru_forward_fused(cast(x), cast(w_ih), cast(w_hh), cast(b_hn), cast(h0), cast(img), lengths)
        assert len(saved) == 3
        for name, a, b in zip(("out", "gates"), saved, gru_reference_forward(xp, w_hh, b_hn, h0, img, lengths)):
            assert_close(a, b.to(dtype), dtype, f"training forward: {name}")
        assert_close(saved[2], ref[1].to(dtype), dtype, "training forward: h_last")
        no_bias = _C.gru_infer(cast(x), cast(w_ih), cast(w_hh), None, cast(h0), cast(img), lengths)
        for k, (a, b) in enumerate(zip(no_bias, gru_recurrence_ref(xp, w_hh, h0, img, lengths))):
            assert_close(a, b.to(dtype), dtype, f"without b_hn: output {k}")
    else:
        got = _C.lstm_infer(cast(x), cast(w_ih), cast(w_hh), cast(h0), cast(c0), cast(img), lengths)
        ref = lstm_recurrence_ref(xp, w_hh, h0, c0, img, lengths)
        saved = _C.lstm_forward_fused(cast(x), cast(w_ih), cast(w_hh), cast(h0), cast(c0), cast(img), lengths)
        assert len(saved) == 5
        for name, a, b in zip(("out", "c_all", "gates"), saved, lstm_reference_forward(xp, w_hh, h0, c0, img, lengths)):
            assert_close(a, b.to(dtype), dtype, f"training forward: {name}")
        assert_close(saved[3], ref[1].to(dtype), dtype, "training forward: h_last")
        assert_close(saved[4], ref[2].to(dtype), dtype, "training forward: c_last")
    for k, (a, b) in enumerate(zip(got, ref)):
        assert_close(a, b.to(dtype), dtype, f"output {k}")


def test_fused_inference_rejects_mismatched_weights():
    from mmrnn_ext import _C

    x = torch.randn(3, 2, 5)
    with pytest.raises(RuntimeError, match=r"w_ih: expected shape \[8, 5\]"):
        _C.lstm_infer(x, torch.randn(8, 4), torch.randn(8, 2), torch.zeros(2, 2), torch.zeros(2, 2), None, None)
    with pytest.raises(RuntimeError, match=r"w_hh: expected shape \[4H, H\]"):
        _C.lstm_infer(x, torch.randn(8, 5), torch.randn(8, 3), torch.zeros(2, 2), torch.zeros(2, 2), None, None)
    with pytest.raises(RuntimeError, match=r"w_ih: expected shape \[6, 5\]"):
        _C.gru_infer(x, torch.randn(6, 4), torch.randn(6, 2), None, torch.zeros(2, 2), None, None)
    with pytest.raises(RuntimeError, match="the GRU's fused input product computes float32 and float64, got BFloat16"):
        _C.gru_forward_fused(x.bfloat16(), torch.randn(6, 5).bfloat16(), torch.randn(6, 2).bfloat16(), None,
                             torch.zeros(2, 2).bfloat16(), None, None)


def test_bad_isa_switch_is_an_error(monkeypatch):
    from mmrnn_ext import _C

    monkeypatch.setenv("MMRNN_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="MMRNN_CPU_ISA: expected avx512_bf16, avx512, avx2 or generic, got 'sse9'"):
        _C.cpu_isa()
    with pytest.raises(RuntimeError, match="MMRNN_CPU_ISA"):
        mmrnn_ext.rnn_recurrence(torch.randn(2, 1, 3), torch.randn(3, 3), backend="cpp")


def _module(cell, **kw):
    cls = {"rnn": mmrnn_ext.RNN, "lstm": mmrnn_ext.LSTM, "gru": mmrnn_ext.GRU}[cell]
    torch.manual_seed(0)
    return cls(12, 40, num_layers=2, bidirectional=True, image_size=6, backend="cpp", **kw)


def _flat(result):
    out, states = result
    return [out, *(states if isinstance(states, tuple) else (states,))]


def _count_engine_calls(monkeypatch):
    """Counts the engine's input products (linear, transposed W: the forward's; not: the input
    gradient's), its fused training forwards and its weight-gradient passes."""
    from mmrnn_ext import _C

    calls = {"product": 0, "input grad": 0, "fused": 0}

    def counted(name, real):
        def call(*args):
            calls[name] += 1
            return real(*args)
        return call

    real_linear = _C.linear
    monkeypatch.setattr(_C, "linear", lambda x, w, transpose_w=True: counted(
        "product" if transpose_w else "input grad", real_linear)(x, w, transpose_w))
    def fused_or_not(real):  # the infer kernels: fused when given W_ih (their second argument)
        return lambda *args: counted("fused" if args[1] is not None else "unfused", real)(*args)

    calls["unfused"] = 0
    calls["weight grad"] = 0
    monkeypatch.setattr(_C, "weight_grad", counted("weight grad", _C.weight_grad))
    monkeypatch.setattr(_C, "rnn_infer", fused_or_not(_C.rnn_infer))
    monkeypatch.setattr(_C, "lstm_infer", fused_or_not(_C.lstm_infer))
    monkeypatch.setattr(_C, "gru_infer", fused_or_not(_C.gru_infer))
    monkeypatch.setattr(_C, "lstm_forward_fused", counted("fused", _C.lstm_forward_fused))
    monkeypatch.setattr(_C, "gru_forward_fused", counted("fused", _C.gru_forward_fused))
    return calls


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("create_graph", [False, True], ids=["first-order", "create-graph"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "separate"])
@pytest.mark.parametrize("image", ["step", "static", "step-unfolded"])
def test_training_input_product_on_the_engine(monkeypatch, cell, create_graph, fuse, image):
    """With gradients (float32) the modules run the input product on the engine — inside the
    recurrence's tiles (fused; separate: FUSE_TRAINING_PRODUCT off), the image term and biases
    inside the same op when fused — and, first order, its input gradient dA @ W_ih and the weight
    gradients too: every gradient (the input's and the image's, through both layers and directions,
    and every parameter's) against the same module in float64 on torch's products, at odd sizes with
    batch_first (a non-contiguous time-major input), lengths and a per-step image (folded into the
    input product; step-unfolded: FOLD_STEP_IMAGE off, a [T, B, G] image term) or a static one.
    create_graph: the input gradient runs as torch ops, so a second-order gradient exists."""
    monkeypatch.setattr(RecurrentBase, "FUSE_TRAINING_PRODUCT", fuse)
    monkeypatch.setattr(RecurrentBase, "FOLD_STEP_IMAGE", image != "step-unfolded")
    calls = _count_engine_calls(monkeypatch)
    m = _module(cell)
    m.batch_first = True
    ref = _module(cell).double()
    ref.batch_first = True
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 7, 12, generator=g, dtype=torch.float64)
    img = torch.randn(5, 6, generator=g, dtype=torch.float64) if image == "static" else \
        torch.randn(5, 7, 6, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 1, 6, 7])
    weight = torch.randn(5, 7, 80, generator=g, dtype=torch.float64)

    def grads(model, dtype):
        xi, imgi = x.to(dtype).requires_grad_(), img.to(dtype).requires_grad_()
        out, states = model(xi, image=imgi, lengths=lengths)
        loss = (out * weight.to(dtype)).sum() + sum(s.sin().sum() for s in _flat((out, states))[1:])
        params = list(model.parameters())
        got = torch.autograd.grad(loss, [xi, imgi, *params], create_graph=create_graph)
        first.update(calls)
        second = None
        if create_graph:
            # d/d(every parameter) of |dL/dx|^2
            second = torch.autograd.grad(got[0].square().sum(), params)
        return out, got, second

    first = {}
    out, got, second = grads(m, torch.float32)
    # 2 layers x 2 directions: fused forwards or separate products on the engine; their input
    # gradients there too, except under create_graph (torch's matmul: differentiable)
    fused = fuse
    # first order, the weight gradients on the engine: fused, dW_ih and dW_hh in one pass per layer
    # and direction (the GRU's n rows of dW_hh from its tail); else dW_ih's and dW_hh's (the GRU's
    # dW_hh in two: r and z, then n)
    passes = 0 if create_graph else 4 if fused else 12 if cell == "gru" else 8
    # fused, first order, a static image: its gradient S @ W_img from the step sums on the engine too
    image_grads = 4 if fused and not create_graph and image == "static" else 0
    assert first == {"product": 0 if fused else 4, "fused": 4 if fused else 0,
                     "input grad": (0 if create_graph else 4) + image_grads, "unfused": 0, "weight grad": passes}
    before = dict(calls)
    r_out, r_got, r_second = grads(ref, torch.float64)
    assert calls == before  # float64: torch's products only
    assert_close(out, r_out.float(), torch.float32, "output")
    names = ["input", "image", *(n for n, _ in m.named_parameters())]
    for name, a, b in zip(names, got, r_got, strict=True):
        assert_close(a, b.float(), torch.float32, f"grad of {name}")
    if create_graph:
        for name, a, b in zip(names[2:], second, r_second, strict=True):
            assert_close(a, b.float(), torch.float32, f"second-order gradient, {name}")


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_fused_training_forward_from_batch_two(monkeypatch, cell):
    """The fused training forward (and float32 inference's fused kernel) is taken from B = 2 up; at
    B = 1 (a step bound by reading the weights) the separate product. Both give the reference's
    gradients, h0 and c0 given too, and the same bits on a repeated call; inference equals training."""
    calls = _count_engine_calls(monkeypatch)
    for B, fused in ((1, 0), (2, 4), (3, 4)):
        torch.manual_seed(B)
        m = _module(cell, bias=False)
        ref = _module(cell, bias=False).double()
        x, v = torch.randn(4, B, 12), torch.randn(B, 6)
        hx = tuple(torch.randn(4, B, 40) for _ in range(2 if cell == "lstm" else 1))
        hx = hx if cell == "lstm" else hx[0]
        results = []
        for model, dtype in ((m, torch.float32), (ref, torch.float64)):
            h = tuple(t.to(dtype).requires_grad_() for t in (hx if cell == "lstm" else (hx,)))
            out, _ = model(x.to(dtype), h if cell == "lstm" else h[0], image=v.to(dtype))
            results.append(torch.autograd.grad(out.square().sum(), [*h, *model.parameters()]))
            if dtype == torch.float32:
                assert calls["fused"] == fused and calls["product"] == 4 - fused, (B, calls)
            calls.update({k: 0 for k in calls})
        for a, b in zip(*results):
            assert_close(a, b.float(), torch.float32, f"B={B}")
        h = tuple(t.clone().requires_grad_() for t in (hx if cell == "lstm" else (hx,)))
        again = torch.autograd.grad(m(x, h if cell == "lstm" else h[0], image=v)[0].square().sum(), [*h, *m.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(results[0], again))  # the same bits, call to call
        calls.update({k: 0 for k in calls})
        with torch.no_grad():
            y = m(x, hx, image=v)[0]
        assert calls["fused"] == fused and calls["product"] == 4 - fused, (B, calls)
        assert_close(y, m(x, hx, image=v)[0].detach(), torch.float32, f"B={B}: inference")
        calls.update({k: 0 for k in calls})


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("image", ["static", "step"])
def test_inference_forward_equals_training_forward(cell, image):
    """no_grad / inference_mode take the inference forward (and the engine's input product): the
    same numbers as the forward that saves for backward, lengths and final states included (within
    float32 rounding: the input products differ in summation order; the recurrences alone agree bit
    for bit, test_inference_forward_is_taken_and_saves_nothing)."""
    m = _module(cell)
    x = torch.randn(9, 5, 12)
    img = torch.randn(5, 6) if image == "static" else torch.randn(9, 5, 6)
    lengths = torch.tensor([9, 3, 0, 7, 1])
    train = _flat(m(x, image=img, lengths=lengths))
    assert train[0].grad_fn is not None
    with torch.no_grad():
        nograd = _flat(m(x, image=img, lengths=lengths))
    with torch.inference_mode():
        inference = _flat(m(x, image=img, lengths=lengths))
    for a, b, c in zip(train, nograd, inference):
        assert b.grad_fn is None and not b.requires_grad
        assert_close(b, a.detach(), torch.float32, "no_grad")
        assert torch.equal(b, c)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_inference_forward_is_taken_and_saves_nothing(monkeypatch, cell):
    """Under no_grad the op calls the backend's inference forward (which returns only the public
    outputs); with grad enabled and an input requiring grad it does not."""
    from mmrnn_ext import _C

    name = f"{cell}_infer"
    calls = []
    real = getattr(_C, name)
    monkeypatch.setattr(_C, name, lambda *a: calls.append(1) or real(*a))
    args, lens = make_gated_inputs(cell, 4, 3, 9, "static", torch.float32, lengths=True)
    op = mmrnn_ext.lstm_recurrence if cell == "lstm" else mmrnn_ext.gru_recurrence
    with torch.no_grad():
        outs = op(*args, lengths=lens, backend="cpp")
    assert calls == [1] and len(outs) == (3 if cell == "lstm" else 2)
    trained = op(*args, lengths=lens, backend="cpp")
    assert calls == [1]
    for a, b in zip(outs, trained):
        assert torch.equal(a, b.detach())  # the same kernels: the same bits
    detached = [None if a is None else a.detach() for a in args]
    op(*detached, lengths=lens, backend="cpp")  # grad mode on, nothing requires grad
    assert calls == [1, 1]


def _run(m, seed):
    """A module's forward and backward on inputs drawn from a private generator (the global one is
    shared by every thread)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(11, 9, 12, generator=g).requires_grad_()
    img = torch.randn(9, 6, generator=g)
    outs = _flat(m(x, image=img, lengths=torch.tensor([11, 4, 0, 9, 1, 11, 2, 8, 5])))
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)
    grads = torch.autograd.grad(loss, [x, *m.parameters()])
    return [o.detach() for o in outs] + list(grads)


def _run_op(cell, seed, B=9, H=80):
    """The op alone (what the engine computes: outputs, the gradients BPTT returns directly and the
    weight gradient W_hh's)."""
    if cell == "rnn":
        from op_cases import make_inputs
        xp, w, h0, img, lens = make_inputs(6, B, H, "step", torch.float32, lengths=True, seed=seed)
        outs = mmrnn_ext.rnn_recurrence(xp, w, h0, img, lens, backend="cpp")
        states = [xp, w, h0]
    else:
        args, lens = make_gated_inputs(cell, 6, B, H, "step", torch.float32, lengths=True, seed=seed)
        op = mmrnn_ext.lstm_recurrence if cell == "lstm" else mmrnn_ext.gru_recurrence
        outs = op(*args, lengths=lens, backend="cpp")
        states = [args[0], args[1]] + ([args[2], args[3]] if cell == "lstm" else [args[3]])
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, states))


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("B,H", [(9, 80), (13, 300)])
def test_one_or_more_threads_same_bits(cell, B, H):
    """A step's tiles are computed the same whichever thread takes them. B = 9, H = 80: the steps are
    large enough to be split over two workers; B = 13, H = 300: the workers' runs of tiles end
    inside a panel (5 panels of 64 columns with AVX-512 in the BPTT, 3 row blocks: 15 tiles over 2
    or 3 workers) and the weights outgrow a thread's L2 (the alternating walk, the prefetch)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_op(cell, 3, B, H)
        for n in (2, 3):
            torch.set_num_threads(n)
            for a, b in zip(one, _run_op(cell, 3, B, H)):
                assert torch.equal(a, b), f"{n} threads"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_concurrent_calls_match_serial(cell):
    """Four Python threads at once (the GIL released in the kernels, each call with its own barrier),
    forward and backward: every result equals the serial one bit for bit."""
    modules = [_module(cell) for _ in range(4)]  # built here: initialisation draws from the global RNG
    serial = [_run(modules[s], s) for s in range(4)]
    results, errors = [None] * 4, []

    def work(s):
        try:
            for _ in range(2):
                results[s] = _run(modules[s], s)
        except Exception as exc:  # reported below: a thread's exception would otherwise be lost
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for s in range(4):
        for a, b in zip(serial[s], results[s]):
            assert torch.equal(a, b)
    # the op alone (no torch GEMMs around it), the same way
    serial = [_run_op(cell, s) for s in range(4)]
    results = [None] * 4
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, _run_op(cell, s))) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in range(4):
        assert results[s] is not None
        for a, b in zip(serial[s], results[s]):
            assert torch.equal(a, b)


def test_engine_product_takes_a_non_contiguous_weight():
    """A weight_ih that is a transposed view (assigned by the user) reaches the engine's product as
    a contiguous copy, with gradients and without: the same numbers as the float64 module."""
    torch.manual_seed(3)
    m = mmrnn_ext.GRU(5, 7, image_size=3, backend="cpp")
    m.weight_ih_l0 = torch.nn.Parameter(torch.randn(5, 21).t())
    x, img = torch.randn(4, 2, 5), torch.randn(2, 3)
    out, _ = m(x, image=img)
    out.square().sum().backward()
    ref = copy.deepcopy(m).double()
    ref.zero_grad(set_to_none=True)
    r_out, _ = ref(x.double(), image=img.double())
    r_out.square().sum().backward()
    assert_close(out, r_out.float(), torch.float32, "output")
    assert_close(m.weight_ih_l0.grad, ref.weight_ih_l0.grad.float(), torch.float32, "grad of weight_ih_l0")
    with torch.no_grad():
        assert_close(m(x, image=img)[0], r_out.detach().float(), torch.float32, "inference output")


def _bptt_call(cell, T, B, H, dtype, lengths, seed=0):
    """(the backward function, its arguments, the step sums' width) for a forward of `cell` on fresh
    random inputs (lengths: one row of length 0, one of T, the rest between)."""
    from mmrnn_ext import _C

    g = torch.Generator().manual_seed(seed)
    G = {"rnn": 1, "lstm": 4, "gru": 3}[cell] * H
    rnd = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * 0.5).to(dtype)  # noqa: E731
    xp, w, h0, c0, img = rnd(T, B, G), rnd(G, H), rnd(B, H), rnd(B, H), rnd(B, G)
    lens = None
    if lengths:
        lens = torch.randint(0, T + 1, (B,), generator=g)
        lens[0], lens[-1] = 0, T
    if cell == "rnn":
        out = _C.rnn_forward(xp, w, h0, img, lens, False)
        return _C.rnn_backward, (rnd(T, B, H), rnd(B, H), out, h0, w, lens, False), H
    if cell == "lstm":
        out, c_all, gates = _C.lstm_forward(xp, w, h0, c0, img, lens)
        return _C.lstm_backward, (rnd(T, B, H), rnd(B, H), rnd(B, H), out, c_all, gates, h0, c0, w, lens), G
    out, gates = _C.gru_forward(xp, w, rnd(H), h0, img, lens)
    return _C.gru_backward, (rnd(T, B, H), rnd(B, H), out, gates, h0, w, lens), 4 * H


@pytest.mark.parametrize("isa", ORDER)
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("T,B,H", [(5, 1, 7), (4, 13, 65), (3, 3, 1), (7, 12, 33)], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_bptt_step_sums_every_path(monkeypatch, isa, cell, T, B, H, dtype):
    """The BPTT's step sums (sums=, csrc/common.h step_sums_data) are each row's step gradients summed
    over time, [dA] or the GRU's [dGx | dhn], computed in the carry dtype from the gradients before
    they are stored; asking for them leaves every other output bit for bit as it was; a buffer
    holding anything is overwritten."""
    _force(monkeypatch, isa)
    fn, args, width = _bptt_call(cell, T, B, H, dtype, lengths=True)
    plain = fn(*args)
    carry = torch.float64 if dtype == torch.float64 else torch.float32
    sums = torch.full((B, width), 7.0, dtype=carry)
    summed = fn(*args, sums=sums)
    for a, b in zip(plain, summed):
        assert torch.equal(a, b)
    grads = plain[0] if cell != "gru" else torch.cat([plain[0], plain[1]], dim=2)
    expected = grads.to(carry).sum(0)
    if dtype == torch.bfloat16:
        # the sums add the float32 values each stored bfloat16 gradient was rounded from
        torch.testing.assert_close(sums, expected, atol=1e-2 * max(1.0, expected.abs().max().item()), rtol=1e-2)
    else:
        assert_close(sums, expected, dtype, f"{cell} step sums")
    if B > 1:
        assert sums[0].eq(0).all(), "a row of length 0 has no step gradients"


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_bptt_step_sums_same_bits_and_bad_buffer(cell):
    """1, 2 or 3 threads give the step sums bit for bit (each element is one tile's, added in step
    order); a buffer of the wrong dtype or shape is refused before anything runs."""
    fn, args, width = _bptt_call(cell, 6, 13, 300, torch.float32, lengths=True, seed=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.empty(13, width)
        fn(*args, sums=one)
        for n in (2, 3):
            torch.set_num_threads(n)
            again = torch.empty(13, width)
            fn(*args, sums=again)
            assert torch.equal(one, again), f"{n} threads"
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(RuntimeError, match=rf"sums: expected a contiguous CPU Float tensor of shape \[13, {width}\], "
                                           rf"got Double of shape \[13, {width}\]"):
        fn(*args, sums=torch.empty(13, width, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=rf"sums: expected .* of shape \[13, {width}\], got Float of shape \[13, 5\]"):
        fn(*args, sums=torch.empty(13, 5))
    bf16_fn, bf16_args, _ = _bptt_call(cell, 2, 3, 4, torch.bfloat16, lengths=False)
    with pytest.raises(RuntimeError, match="sums: expected a contiguous CPU Float tensor"):
        bf16_fn(*bf16_args, sums=torch.empty(3, bf16_args[0].shape[2] * (1 if cell == "rnn" else 4),
                                             dtype=torch.bfloat16))
