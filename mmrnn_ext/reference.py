"""Plain-PyTorch definition of the fused recurrence: the executable spec every backend is tested against.

Conventions shared by every backend (time-major):

    xp:         [T, B, H]  projected input, x_t @ W_ih^T + b_ih + b_hh
    w_hh:       [H, H]
    h0:         [B, H]
    image_term: None, [B, H] (static: the same for every step) or [T, B, H] (per step)
    lengths:    None or int64 [B], 0 <= lengths[b] <= T

    a_t = xp_t + h_{t-1} @ w_hh^T + image_term(_t);   h_t = f(a_t),  f = tanh or relu

Row b stops at lengths[b]: for t >= lengths[b] its state stays h_{lengths[b]-1} (h0 when the length
is 0) and its output is zero. Returns (out [T, B, H], h_last [B, H]).
"""
from __future__ import annotations

import torch

NONLINEARITIES = ("tanh", "relu")


def activation(a: torch.Tensor, nonlinearity: str) -> torch.Tensor:
    return torch.tanh(a) if nonlinearity == "tanh" else torch.relu(a)


def activation_grad_from_output(h: torch.Tensor, nonlinearity: str) -> torch.Tensor:
    """f'(a) written in terms of h = f(a): 1 - h^2 for tanh, 1[h > 0] for relu."""
    if nonlinearity == "tanh":
        return 1.0 - h * h
    return (h > 0).to(h.dtype)


def rnn_recurrence_ref(xp, w_hh, h0, image_term=None, lengths=None, nonlinearity="tanh"):
    """Naive step loop, differentiable by autograd. The definition of the op, not a fast path."""
    T, B, _ = xp.shape
    h = h0
    outs = []
    for t in range(T):
        a = xp[t] + h @ w_hh.t()
        if image_term is not None:
            a = a + (image_term if image_term.dim() == 2 else image_term[t])
        h_new = activation(a, nonlinearity)
        if lengths is None:
            h = h_new
            outs.append(h_new)
        else:
            live = (t < lengths).unsqueeze(1)
            h = torch.where(live, h_new, h)
            outs.append(torch.where(live, h_new, torch.zeros_like(h_new)))
    out = torch.stack(outs) if outs else xp.new_zeros(0, B, w_hh.shape[0])
    return out, h


# ---------------------------------------------------------------------------------------------
# The "reference" backend: the same contract as the compiled kernels (forward returns every step's
# output; backward returns dA and dh0), written with torch ops. It is the fallback wherever no
# faster backend serves; low-precision inputs are computed in float32 and cast back once.
# ---------------------------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def reference_forward(xp, w_hh, h0, image_term, lengths, nonlinearity):
    """-> out [T, B, H] (zero past each row's length)."""
    ct = _compute_dtype(xp.dtype)
    T = xp.shape[0]
    xp_c, w_c, h = xp.to(ct), w_hh.to(ct), h0.to(ct)
    img = None if image_term is None else image_term.to(ct)
    out = torch.empty(xp.shape, dtype=ct, device=xp.device)
    for t in range(T):
        a = torch.addmm(xp_c[t], h, w_c.t())
        if img is not None:
            a += img if img.dim() == 2 else img[t]
        h_new = activation(a, nonlinearity)
        if lengths is None:
            h = h_new
            out[t] = h_new
        else:
            live = (t < lengths).unsqueeze(1)
            h = torch.where(live, h_new, h)
            out[t] = torch.where(live, h_new, torch.zeros_like(h_new))
    return out.to(xp.dtype)


def reference_backward(grad_out, grad_h_last, out, h0, w_hh, lengths, nonlinearity):
    """BPTT. -> (dA [T, B, H], dh0 [B, H]); dA_t = dL/da_t, zero past each row's length."""
    ct = _compute_dtype(out.dtype)
    T, B, H = out.shape
    out_c, w_c = out.to(ct), w_hh.to(ct)
    gy = grad_out.to(ct)
    g_last = grad_h_last.to(ct)
    dA = torch.empty((T, B, H), dtype=ct, device=out.device)
    g = g_last  # dL/dh_t carried from step t+1 (plus h_last's gradient at the row's last step)
    for t in range(T - 1, -1, -1):
        if lengths is not None:
            # a row's h_last is h_{len-1}: its gradient enters at that step; later steps are dead
            g = torch.where((t == lengths - 1).unsqueeze(1), g_last, g)
        d = (gy[t] + g) * activation_grad_from_output(out_c[t], nonlinearity)
        if lengths is not None:
            d = torch.where((t < lengths).unsqueeze(1), d, torch.zeros_like(d))
        dA[t] = d
        g = d @ w_c
    if T == 0:
        g = g_last.clone()  # never hand back the caller's own tensor
    elif lengths is not None:
        g = torch.where((lengths == 0).unsqueeze(1), g_last, g)
    return dA.to(out.dtype), g.to(out.dtype)
