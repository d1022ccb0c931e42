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


def _masked(t, lengths, new, kept):
    """The lengths rule of every cell at step t: rows live at t take the new value and output it;
    the others keep `kept` and output zero. -> (state after step t, output of step t)."""
    if lengths is None:
        return new, new
    live = (t < lengths).unsqueeze(1)
    return torch.where(live, new, kept), torch.where(live, new, 0)


def _advance(t, lengths, new, old, outs):
    """_masked for a readable definition: appends the step's output, returns the state."""
    state, output = _masked(t, lengths, new, old)
    outs.append(output)
    return state


def rnn_recurrence_ref(xp, w_hh, h0, image_term=None, lengths=None, nonlinearity="tanh"):
    """Naive step loop, differentiable by autograd. The definition of the op, not a fast path."""
    T, B, _ = xp.shape
    h = h0
    outs = []
    for t in range(T):
        a = xp[t] + h @ w_hh.t()
        if image_term is not None:
            a = a + (image_term if image_term.dim() == 2 else image_term[t])
        h = _advance(t, lengths, activation(a, nonlinearity), h, outs)
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


def _stack_reversed(steps, T, B, width, like, ct):
    """The per-step results of a reverse loop (appended from t = T-1 down), as [T, B, width]. Built
    out of place (no writes into a preallocated tensor), so that the BPTT below stays differentiable
    and vmappable: it is also the second-order path of every backend (see ops/common.py)."""
    if not steps:
        return like.new_zeros((T, B, width), dtype=ct)
    return torch.stack(steps[::-1])


def reference_backward(grad_out, grad_h_last, out, h0, w_hh, lengths, nonlinearity):
    """BPTT. -> (dA [T, B, H], dh0 [B, H]); dA_t = dL/da_t, zero past each row's length."""
    ct = _compute_dtype(out.dtype)
    T, B, H = out.shape
    out_c, w_c = out.to(ct), w_hh.to(ct)
    gy = grad_out.to(ct)
    g_last = grad_h_last.to(ct)
    dA = []
    g = g_last  # dL/dh_t carried from step t+1 (plus h_last's gradient at the row's last step)
    for t in range(T - 1, -1, -1):
        if lengths is not None:
            # a row's h_last is h_{len-1}: its gradient enters at that step; later steps are dead
            g = torch.where((t == lengths - 1).unsqueeze(1), g_last, g)
        d = (gy[t] + g) * activation_grad_from_output(out_c[t], nonlinearity)
        if lengths is not None:
            d = torch.where((t < lengths).unsqueeze(1), d, torch.zeros_like(d))
        dA.append(d)
        g = d @ w_c
    if T == 0:
        g = g_last.clone()  # never hand back the caller's own tensor
    elif lengths is not None:
        g = torch.where((lengths == 0).unsqueeze(1), g_last, g)
    return _stack_reversed(dA, T, B, H, out, ct).to(out.dtype), g.to(out.dtype)


# =============================================================================================
# LSTM: gates in torch's order (i, f, g, o); G = 4.
#
#     xp:         [T, B, 4H]  x_t @ W_ih^T (+ biases), w_hh [4H, H], h0, c0 [B, H]
#     image_term: None, [B, 4H] (static) or [T, B, 4H] (per step)
#     [i f g o] = xp_t + h_{t-1} @ w_hh^T + image_term(_t)
#     c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g);   h_t = sigmoid(o) * tanh(c_t)
#     (w_hr [P, H] given: h_t = (sigmoid(o) * tanh(c_t)) @ w_hr^T, and w_hh is [4H, P], h0 [B, P])
#
# Rows stop at their length as in the RNN: output zero past it, (h, c) kept at the last valid step.
# Returns (out [T, B, H or P], h_last, c_last).
# =============================================================================================

def lstm_recurrence_ref(xp, w_hh, h0, c0, image_term=None, lengths=None, w_hr=None):
    """Naive step loop, differentiable by autograd. The definition of the op, not a fast path."""
    T, B, _ = xp.shape
    h, c = h0, c0
    outs = []
    for t in range(T):
        a = xp[t] + h @ w_hh.t()
        if image_term is not None:
            a = a + (image_term if image_term.dim() == 2 else image_term[t])
        i, f, g, o = a.chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        if lengths is None:
            h, c = h_new, c_new
            outs.append(h_new)
        else:
            live = (t < lengths).unsqueeze(1)
            h, c = torch.where(live, h_new, h), torch.where(live, c_new, c)
            outs.append(torch.where(live, h_new, torch.zeros_like(h_new)))
    out = torch.stack(outs) if outs else xp.new_zeros(0, B, h0.shape[1])
    return out, h, c


# =============================================================================================
# GRU: gates in torch's order (r, z, n); G = 3. b_hn stays inside the reset product; the image
# term (like the input) stays outside it.
#
#     xp:         [T, B, 3H]  x_t @ W_ih^T (+ b_ih, + b_hh for r and z), w_hh [3H, H], b_hn None | [H]
#     image_term: None, [B, 3H] (static) or [T, B, 3H] (per step)
#     gh = h_{t-1} @ w_hh^T;   [xr xz xn] = xp_t + image_term(_t)
#     r = sigmoid(xr + gh_r);  z = sigmoid(xz + gh_z);  n = tanh(xn + r * (gh_n + b_hn))
#     h_t = (1 - z) * n + z * h_{t-1}
# Returns (out [T, B, H], h_last).
# =============================================================================================

def gru_gates(x, h, w_hh, b_hn):
    """One GRU step's gates from x = xp_t + image term: (r, z, n, W_hn h + b_hn)."""
    xr, xz, xn = x.chunk(3, dim=-1)
    hr, hz, hn = (h @ w_hh.t()).chunk(3, dim=-1)
    if b_hn is not None:
        hn = hn + b_hn
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    return r, z, torch.tanh(xn + r * hn), hn


def gru_recurrence_ref(xp, w_hh, h0, image_term=None, lengths=None, b_hn=None):
    """Naive step loop, differentiable by autograd. The definition of the op, not a fast path."""
    T, B, _ = xp.shape
    h = h0
    outs = []
    for t in range(T):
        x = xp[t]
        if image_term is not None:
            x = x + (image_term if image_term.dim() == 2 else image_term[t])
        r, z, n, _ = gru_gates(x, h, w_hh, b_hn)
        h = _advance(t, lengths, (1 - z) * n + z * h, h, outs)
    out = torch.stack(outs) if outs else xp.new_zeros(0, B, h0.shape[1])
    return out, h


# --- the "reference" backend of the gated cells: the contract the C++ backend implements --------
#
# LSTM forward  -> out [T, B, H], c_all [T, B, H], gates [T, B, 4H] (sigmoid(i), sigmoid(f), tanh(g),
#                  sigmoid(o)); all three zero past each row's length. Backward reads these, h0, c0
#                  and w_hh (tanh(c_t) is recomputed: cheaper than storing it).
# LSTM backward -> dG [T, B, 4H] (dL/d pre-activation, zero past each length), dh0, dc0; also takes
#                  the gradients of c_all and gates (None: zero), which only a second-order pass produces
#                  (the reference BPTT is then the differentiable one, see ops/common.py)
# GRU forward   -> out [T, B, H], gates [T, B, 4H] (r, z, n, gh_n + b_hn); zero past each length
# GRU backward  -> dGx [T, B, 3H] (dL/d(xp + image term)), dhn [T, B, H] (dL/d(gh_n + b_hn)), dh0;
#                  dW_hh = [dGx_r, dGx_z, dhn]^T h_{t-1} summed over steps, d b_hn = sum of dhn; also
#                  takes the gradient of gates (None: zero), as the LSTM's.

def _carried(t, lengths, g_last, g):
    """The gradient arriving at step t: the final state's gradient at each row's last step."""
    if lengths is None:
        return g
    return torch.where((t == lengths - 1).unsqueeze(1), g_last, g)


def _initial_grad(T, lengths, g_last, g):
    if T == 0:
        return g_last.clone()
    if lengths is None:
        return g
    return torch.where((lengths == 0).unsqueeze(1), g_last, g)


def lstm_reference_forward(xp, w_hh, h0, c0, image_term, lengths):
    ct = _compute_dtype(xp.dtype)
    T, B, G = xp.shape
    H = G // 4
    xp_c, w_c, h, c = xp.to(ct), w_hh.to(ct), h0.to(ct), c0.to(ct)
    img = None if image_term is None else image_term.to(ct)
    out = xp.new_zeros((T, B, H), dtype=ct)
    c_all = torch.zeros_like(out)
    gates = xp.new_zeros((T, B, G), dtype=ct)
    for t in range(T):
        a = torch.addmm(xp_c[t], h, w_c.t())
        if img is not None:
            a += img if img.dim() == 2 else img[t]
        i, f, g, o = a.chunk(4, dim=-1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c + i * g
        h, out[t] = _masked(t, lengths, o * torch.tanh(c_new), h)
        c, c_all[t] = _masked(t, lengths, c_new, c)
        _, gates[t] = _masked(t, lengths, torch.cat([i, f, g, o], -1), 0)
    return out.to(xp.dtype), c_all.to(xp.dtype), gates.to(xp.dtype)


def lstm_reference_backward(grad_out, grad_h_last, grad_c_last, out, c_all, gates, h0, c0, w_hh, lengths,
                            grad_c_all=None, grad_gates=None):
    ct = _compute_dtype(out.dtype)
    T, B, H = out.shape
    w_c, gy = w_hh.to(ct), grad_out.to(ct)
    c_c, g_c, c0_c = c_all.to(ct), gates.to(ct), c0.to(ct)
    gh_last, gc_last = grad_h_last.to(ct), grad_c_last.to(ct)
    dG = []
    gh, gc = gh_last, gc_last  # dL/dh_t and dL/dc_t arriving from step t+1
    for t in range(T - 1, -1, -1):
        gh, gc = _carried(t, lengths, gh_last, gh), _carried(t, lengths, gc_last, gc)
        i, f, g, o = g_c[t].chunk(4, dim=-1)
        tc = torch.tanh(c_c[t])
        c_prev = c0_c if t == 0 else c_c[t - 1]
        dh = gy[t] + gh
        dc = gc + dh * o * (1 - tc * tc)
        if grad_c_all is not None:
            dc = dc + grad_c_all[t].to(ct)
        d_act = [dc * g, dc * c_prev, dc * i, dh * tc]  # dL/d(activated i, f, g, o)
        if grad_gates is not None:
            d_act = [a + e for a, e in zip(d_act, grad_gates[t].to(ct).chunk(4, dim=-1))]
        d = torch.cat([d_act[0] * i * (1 - i), d_act[1] * f * (1 - f), d_act[2] * (1 - g * g), d_act[3] * o * (1 - o)], -1)
        if lengths is not None:
            d = torch.where((t < lengths).unsqueeze(1), d, 0)
        dG.append(d)
        gh, gc = d @ w_c, dc * f
    gh, gc = _initial_grad(T, lengths, gh_last, gh), _initial_grad(T, lengths, gc_last, gc)
    return (_stack_reversed(dG, T, B, 4 * H, out, ct).to(out.dtype), gh.to(out.dtype), gc.to(out.dtype))


def gru_reference_forward(xp, w_hh, b_hn, h0, image_term, lengths):
    ct = _compute_dtype(xp.dtype)
    T, B, G = xp.shape
    H = G // 3
    xp_c, w_c, h = xp.to(ct), w_hh.to(ct), h0.to(ct)
    img = None if image_term is None else image_term.to(ct)
    bhn = None if b_hn is None else b_hn.to(ct)
    out = xp.new_zeros((T, B, H), dtype=ct)
    gates = xp.new_zeros((T, B, 4 * H), dtype=ct)
    for t in range(T):
        x = xp_c[t]
        if img is not None:
            x = x + (img if img.dim() == 2 else img[t])
        r, z, n, hn = gru_gates(x, h, w_c, bhn)
        h, out[t] = _masked(t, lengths, n + z * (h - n), h)
        _, gates[t] = _masked(t, lengths, torch.cat([r, z, n, hn], -1), 0)
    return out.to(xp.dtype), gates.to(xp.dtype)


def gru_reference_backward(grad_out, grad_h_last, out, gates, h0, w_hh, lengths, grad_gates=None):
    ct = _compute_dtype(out.dtype)
    T, B, H = out.shape
    w_c, gy, out_c, g_c, h0_c = w_hh.to(ct), grad_out.to(ct), out.to(ct), gates.to(ct), h0.to(ct)
    gh_last = grad_h_last.to(ct)
    dGx, dhn = [], []
    gh = gh_last
    for t in range(T - 1, -1, -1):
        gh = _carried(t, lengths, gh_last, gh)
        r, z, n, hn = g_c[t].chunk(4, dim=-1)
        h_prev = h0_c if t == 0 else out_c[t - 1]
        dh = gy[t] + gh
        e_r, e_z, e_n, e_hn = (0, 0, 0, 0) if grad_gates is None else grad_gates[t].to(ct).chunk(4, dim=-1)
        dn = (dh * (1 - z) + e_n) * (1 - n * n)
        dz = (dh * (h_prev - n) + e_z) * z * (1 - z)
        dr = (dn * hn + e_r) * r * (1 - r)
        d_hn = dn * r + e_hn
        dx = torch.cat([dr, dz, dn], -1)
        if lengths is not None:
            live = (t < lengths).unsqueeze(1)
            dx, d_hn = torch.where(live, dx, 0), torch.where(live, d_hn, 0)
        dGx.append(dx)
        dhn.append(d_hn)
        gh = torch.cat([dx[:, :2 * H], d_hn], -1) @ w_c + dh * z
    gh = _initial_grad(T, lengths, gh_last, gh)
    return (_stack_reversed(dGx, T, B, 3 * H, out, ct).to(out.dtype), _stack_reversed(dhn, T, B, H, out, ct).to(out.dtype),
            gh.to(out.dtype))


# --- forward-mode AD (torch.func.jvp, forward_ad) of every cell, from what the forward saved --------
#
# Each takes the forward's saved outputs and the tangents of the op's inputs (None: zero) and returns
# the tangents of every output of the op, in its order (the public ones, then those kept for
# backward). Torch ops, so they are themselves differentiable and vmappable.

def _tangent_step(d, t):
    """A tangent's value at step t: None (zero), static [B, .] or per step [T, B, .]."""
    if d is None:
        return 0
    return d if d.dim() == 2 else d[t]


def rnn_reference_jvp(out, h0, w_hh, lengths, nonlinearity, d_xp, d_w, d_h0, d_img):
    """-> (d_out, d_h_last)."""
    ct = _compute_dtype(out.dtype)
    out_c, w_c, h0_c = out.to(ct), w_hh.to(ct), h0.to(ct)
    d_h = torch.zeros_like(h0_c) if d_h0 is None else d_h0.to(ct)
    steps = []
    for t in range(out.shape[0]):
        h_prev = h0_c if t == 0 else out_c[t - 1]
        da = _tangent_step(d_xp, t) + _tangent_step(d_img, t) + d_h @ w_c.t()
        if d_w is not None:
            da = da + h_prev @ d_w.to(ct).t()
        d_h, d_o = _masked(t, lengths, activation_grad_from_output(out_c[t], nonlinearity) * da, d_h)
        steps.append(d_o)
    d_out = torch.stack(steps) if steps else torch.zeros_like(out_c)
    return d_out.to(out.dtype), d_h.to(out.dtype)


def lstm_reference_jvp(out, c_all, gates, h0, c0, w_hh, lengths, d_xp, d_w, d_h0, d_c0, d_img):
    """-> (d_out, d_h_last, d_c_last, d_c_all, d_gates)."""
    ct = _compute_dtype(out.dtype)
    out_c, c_c, g_c, w_c, h0_c, c0_c = (x.to(ct) for x in (out, c_all, gates, w_hh, h0, c0))
    d_h = torch.zeros_like(h0_c) if d_h0 is None else d_h0.to(ct)
    d_c = torch.zeros_like(c0_c) if d_c0 is None else d_c0.to(ct)
    outs, cs, gs = [], [], []
    for t in range(out.shape[0]):
        h_prev, c_prev = (h0_c, c0_c) if t == 0 else (out_c[t - 1], c_c[t - 1])
        dpre = _tangent_step(d_xp, t) + _tangent_step(d_img, t) + d_h @ w_c.t()
        if d_w is not None:
            dpre = dpre + h_prev @ d_w.to(ct).t()
        i, f, g, o = g_c[t].chunk(4, dim=-1)
        pi, pf, pg, po = dpre.chunk(4, dim=-1)
        di, df, dg, do = pi * i * (1 - i), pf * f * (1 - f), pg * (1 - g * g), po * o * (1 - o)
        tc = torch.tanh(c_c[t])
        dc_new = df * c_prev + f * d_c + di * g + i * dg
        dh_new = do * tc + o * (1 - tc * tc) * dc_new
        d_h, d_o = _masked(t, lengths, dh_new, d_h)
        d_c, d_cs = _masked(t, lengths, dc_new, d_c)
        _, d_g = _masked(t, lengths, torch.cat([di, df, dg, do], -1), 0)
        outs.append(d_o)
        cs.append(d_cs)
        gs.append(d_g)
    stack = lambda xs, like: torch.stack(xs) if xs else torch.zeros_like(like)  # noqa: E731
    return tuple(x.to(out.dtype) for x in (stack(outs, out_c), d_h, d_c, stack(cs, c_c), stack(gs, g_c)))


def gru_reference_jvp(out, gates, h0, w_hh, lengths, d_xp, d_w, d_b_hn, d_h0, d_img):
    """-> (d_out, d_h_last, d_gates)."""
    ct = _compute_dtype(out.dtype)
    out_c, g_c, w_c, h0_c = (x.to(ct) for x in (out, gates, w_hh, h0))
    d_h = torch.zeros_like(h0_c) if d_h0 is None else d_h0.to(ct)
    outs, gs = [], []
    for t in range(out.shape[0]):
        h_prev = h0_c if t == 0 else out_c[t - 1]
        dx = _tangent_step(d_xp, t) + _tangent_step(d_img, t)
        dgh = d_h @ w_c.t()
        if d_w is not None:
            dgh = dgh + h_prev @ d_w.to(ct).t()
        dx_r, dx_z, dx_n = (dx.chunk(3, dim=-1) if torch.is_tensor(dx) else (0, 0, 0))
        dgh_r, dgh_z, dgh_n = dgh.chunk(3, dim=-1)
        d_hn = dgh_n + (0 if d_b_hn is None else d_b_hn.to(ct))
        r, z, n, hn = g_c[t].chunk(4, dim=-1)
        dr = r * (1 - r) * (dx_r + dgh_r)
        dz = z * (1 - z) * (dx_z + dgh_z)
        dn = (1 - n * n) * (dx_n + dr * hn + r * d_hn)
        dh_new = dn + dz * (h_prev - n) + z * (d_h - dn)
        d_h, d_o = _masked(t, lengths, dh_new, d_h)
        _, d_g = _masked(t, lengths, torch.cat([dr, dz, dn, d_hn.expand_as(dn)], -1), 0)
        outs.append(d_o)
        gs.append(d_g)
    stack = lambda xs, like: torch.stack(xs) if xs else torch.zeros_like(like)  # noqa: E731
    return tuple(x.to(out.dtype) for x in (stack(outs, out_c), d_h, stack(gs, g_c)))
