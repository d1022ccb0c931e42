"""Shared builders for op-level tests: random inputs on the op's time-major contract and a
comparison of any backend against the autograd-differentiated reference, forward and every gradient."""
import torch

from mmrnn_ext import rnn_recurrence
from mmrnn_ext.reference import rnn_recurrence_ref


def make_inputs(T, B, H, image, dtype, device="cpu", lengths=False, noncontig=False, seed=0):
    """image in {None, "static", "step"}. noncontig: every tensor is a strided slice of a wider one."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        if noncontig:
            wide = torch.randn(*shape[:-1], 2 * shape[-1] + 1, generator=g, dtype=torch.float64)
            t = wide[..., 1::2]
        else:
            t = torch.randn(*shape, generator=g, dtype=torch.float64)
        return (t * scale).to(device=device, dtype=dtype).requires_grad_()

    xp = rnd(T, B, H)
    w_hh = rnd(H, H, scale=1.0 / max(H, 1) ** 0.5)
    h0 = rnd(B, H, scale=0.5)
    img = None if image is None else (rnd(B, H) if image == "static" else rnd(T, B, H))
    lens = None
    if lengths:
        lens = torch.randint(0, T + 1, (B,), generator=g)
        lens[0] = T  # keep the full length in play
    return xp, w_hh, h0, img, lens


def forward_and_grads(fn, xp, w_hh, h0, img, lens, nonlinearity, seed=1):
    out, h_last = fn(xp, w_hh, h0, img, lens, nonlinearity)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    gh = torch.randn(h_last.shape, generator=g, dtype=torch.float64).to(out)
    inputs = [t for t in (xp, w_hh, h0, img) if t is not None]
    grads = torch.autograd.grad((out * go).sum() + (h_last * gh).sum(), inputs, allow_unused=True)
    return out, h_last, grads


def backend_fn(backend):
    return lambda xp, w, h0, img, lens, nl: rnn_recurrence(xp, w, h0, img, lens, nl, backend=backend)


def reference_fn(xp, w, h0, img, lens, nl):
    return rnn_recurrence_ref(xp, w, h0, img, None if lens is None else lens.to(xp.device), nl)


def compare_with_reference(backend, T, B, H, image, dtype, nonlinearity="tanh", lengths=False, noncontig=False,
                           device="cpu", tol=None, ref_dtype=None, seed=0):
    """Run `backend` and the reference on the same inputs; assert forward and gradients agree.
    ref_dtype: compute the reference in this dtype (e.g. float64 for low-precision kernels)."""
    from conftest import assert_close

    args = make_inputs(T, B, H, image, dtype, device, lengths, noncontig, seed)
    out, hl, grads = forward_and_grads(backend_fn(backend), *args, nonlinearity)
    ref_args = args
    if ref_dtype is not None:
        ref_args = [None if a is None else (a if not a.is_floating_point() else a.detach().to(ref_dtype).requires_grad_())
                    for a in args]
    r_out, r_hl, r_grads = forward_and_grads(reference_fn, *ref_args, nonlinearity)
    names = ["d_xp", "d_w_hh", "d_h0", "d_image_term"]
    check = assert_close if tol is None else tol
    check(out, r_out.to(out.dtype), dtype, "out")
    check(hl, r_hl.to(hl.dtype), dtype, "h_last")
    for name, a, b in zip(names, grads, r_grads):
        check(a, None if b is None else b.to(a.dtype), dtype, name)
