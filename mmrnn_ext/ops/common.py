"""What the three cells' ops share: argument checks, the final-state gather, the weight and image
gradients after BPTT, and the eager autograd.Function.

Casting policy (every cell): every backend accumulates in float32 (float64 for float64 inputs) and
returns the input dtype.

Each cell's op (ops/rnn.py, lstm.py, gru.py) is a pair of torch.library custom ops
mmrnn::<cell>_fwd / <cell>_bwd with fake and autograd registrations: torch.compile sees each as one
opaque node (no graph break, no unrolled loop). Eager calls skip the custom op's Python dispatch
(~0.35 ms of host time per training step, measured on a 2-core VM) through ``EagerOp``, which runs
the same forward, context and backward code.
"""
from __future__ import annotations

import torch

from .. import _backends
from ..errors import InputError, InputTypeError  # noqa: F401 (re-exported: mmrnn_ext.ops.InputError)


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"shape {tuple(t.shape)}, {t.dtype}, on {t.device}"


def check_xp(xp, gates: int):
    """xp must be a floating-point [T, B, gates * H] tensor; returns (T, B, H)."""
    if not isinstance(xp, torch.Tensor) or xp.dim() != 3:
        raise InputError(f"xp: expected a 3-D tensor [T, B, {'' if gates == 1 else gates}H], got {_describe(xp)}")
    if not xp.is_floating_point():
        raise InputError(f"xp: expected a floating-point tensor, got {xp.dtype}")
    T, B, G = xp.shape
    if G % gates:
        raise InputError(f"xp: expected a last dimension of {gates} x hidden size (the gates), got {G}")
    return T, B, G // gates


def shape_is(t: torch.Tensor, shape) -> bool:
    """Whether t has exactly `shape`: the ranks first, then each size. (Python's tuple comparison
    compares sizes before ranks: with symbolic sizes under torch.export that would add a guard
    between unrelated dimensions — time against batch — and specialise the exported program.)"""
    return t.dim() == len(shape) and all(a == b for a, b in zip(t.shape, shape))


def check_like(name: str, t, shape, xp) -> None:
    """t must be a tensor of `shape` with xp's dtype and device."""
    if not isinstance(t, torch.Tensor) or not shape_is(t, shape):
        raise InputError(f"{name}: expected shape {tuple(shape)}, got {_describe(t)}")
    if t.dtype != xp.dtype:
        raise InputError(f"{name}: expected dtype {xp.dtype} (the dtype of xp), got {t.dtype}")
    if t.device != xp.device:
        raise InputError(f"{name}: expected device {xp.device} (the device of xp), got {t.device}")


def check_image_term(image_term, T: int, B: int, width: int, xp) -> None:
    if image_term is None:
        return
    if not isinstance(image_term, torch.Tensor) or not (shape_is(image_term, (B, width))
                                                         or shape_is(image_term, (T, B, width))):
        raise InputError(f"image_term: expected shape {(B, width)} (static) or {(T, B, width)} (per step), "
                         f"got {_describe(image_term)}")
    check_like("image_term", image_term, image_term.shape, xp)


def check_lengths(lengths, B: int, T: int, check_values: bool = True) -> None:
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.shape[0] != B:
        raise InputError(f"lengths: expected a 1-D integer tensor of {B} entries (one per batch row), got {_describe(lengths)}")
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
        raise InputError(f"lengths: expected an integer tensor, got {lengths.dtype}")
    if check_values and B > 0:
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > T:
            raise InputError(f"lengths: expected values in [0, {T}] (the sequence length), got min {lo}, max {hi}")


def prepare_lengths(lengths, xp, B: int, T: int, compiling: bool):
    """Checked (values only eagerly: reading them is a host sync) and as contiguous int64 on xp's device."""
    if lengths is None:
        return None
    check_lengths(lengths, B, T, check_values=not compiling)
    return lengths.to(device=xp.device, dtype=torch.int64).contiguous()


def no_gradient_possible(tensors) -> bool:
    """Whether nothing can ask for a gradient of a computation on `tensors` (any iterable; read only
    in grad mode): grad mode off or none requiring grad, no forward-mode AD level open, no torch.func
    transform active. Cheap: it runs on every call."""
    if torch.autograd.forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active():
        return False
    if not torch.is_grad_enabled():
        return True
    return not any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def inference_forward(cell: str, backend: str, inputs):
    """The backend's inference forward for `cell` (it saves nothing for backward and writes only the
    public outputs) when no gradient of this call is possible; None otherwise (and for backends
    without one), so the caller takes the differentiable path."""
    if not no_gradient_possible(inputs):
        return None
    be = _backends.select(backend, inputs[0].device, inputs[0].dtype, cell)
    return be.cells[cell].infer


def last_state(seq, init, lengths):
    """The state at each row's last valid step of seq [T, B, S] (init for rows of length 0); never a
    view of seq or init."""
    T = seq.shape[0]
    if T == 0:
        return init.clone()
    if lengths is None:
        return seq[T - 1].clone()
    idx = (lengths - 1).clamp(min=0).view(1, -1, 1).expand(1, -1, seq.shape[2])
    return torch.where((lengths > 0).unsqueeze(1), seq.gather(0, idx).squeeze(0), init)


def engine_of(ctx, differentiable: bool):
    """The Engine of the backend that ran this op's forward (the cpp backend's; None for the others,
    for the compiled path's registered backward, and where the gradients must have a history)."""
    return None if differentiable else getattr(getattr(ctx, "be", None), "engine", None)


def weight_grad(dG, h0, out, engine=None):
    """dW_hh = sum_t dG_t^T h_{t-1}: with an engine (first order, float32) one pass on its kernels;
    else one torch GEMM over steps 1..T-1 (h_{t-1} = out[t-1]) plus h0's (float64 stays on torch's:
    the tests' reference). dG [T, B, R] may be a column slice of a wider tensor. Rows past their
    length have dG = 0, so the zeros stored there never contribute."""
    if engine is not None and dG.dtype == torch.float32:
        return engine.weight_grad(dG, None, h0, out)[1]
    T, B, R = dG.shape
    d_w = dG[0].t().mm(h0) if T > 0 else h0.new_zeros(R, h0.shape[1])
    if T > 1:
        # steps flattened into rows before slicing: a [T - 1, ...] slice would make torch.compile
        # guard on T - 1 != 1 (its contiguity test) and recompile at T = 2
        d_w = d_w.addmm(dG.flatten(0, 1)[B:].t(), out.flatten(0, 1)[:(T - 1) * B])
    return d_w


def image_grad(dG, static: bool, sums=None):
    """The image term's gradient: dG itself per step; summed over steps when static (`sums`, those
    sums as the BPTT accumulated them where it did: see backend_bptt)."""
    if not static:
        return dG
    return dG.sum(0) if sums is None else sums.to(dG.dtype)


def backend_bptt(impl, args, like, width: int, sums: bool):
    """(impl.backward(*args) as a tuple, S): S [B, width] is each row's step gradients summed over
    time, accumulated by the BPTT itself where it can (impl.step_sums) and `sums` asks (a static
    image term's gradient is wanted), else None. like: a [T, B, .] tensor of the BPTT's dtype."""
    if sums and impl.step_sums:
        S = like.new_empty(like.shape[1], width, dtype=torch.float64 if like.dtype == torch.float64 else torch.float32)
        return tuple(impl.backward(*args, sums=S)), S
    return tuple(impl.backward(*args)), None


def input_weight_grad(dA, x, engine=None):
    """dW_ih = dA^T x over every leading dimension (dA [..., G], x [..., I]): on the engine's kernels
    when given one (first order, float32), else torch's GEMM (a differentiable one under create_graph)."""
    if engine is None:
        return dA.reshape(-1, dA.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))
    return engine.weight_grad(dA.reshape(-1, 1, dA.shape[-1]), x.reshape(-1, 1, x.shape[-1]), None, None)[0]


def zeros_if_none(grad, like):
    return torch.zeros_like(like) if grad is None else grad


def registered_backward(cell, bwd_op):
    """The autograd formula registered for <cell>_fwd (used by torch.compile): the backend's BPTT
    through the <cell>_bwd custom op. It is not itself differentiable, so a double backward through
    it is refused instead of treating the BPTT result as a constant."""
    def backward(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"mmrnn::{cell.CELL}_fwd: a double backward (create_graph=True) through the custom op is not "
                f"supported; call mmrnn_ext's modules or ops outside torch.compile, whose eager path is twice "
                "differentiable (its backward then runs as differentiable torch ops)")
        return cell.input_grads(ctx, grads, lambda *args, sums=False: (bwd_op(*args), None), differentiable=False)

    return backward


class EagerOp(torch.autograd.Function):
    """One cell's forward and backward for eager calls: ``EagerOp.apply(*inputs, cell)``, where the
    inputs are the <cell>_fwd op's (backend name last) and ``cell`` is that cell's op module
    (ops/rnn.py, lstm.py or gru.py; last, so that ctx.needs_input_grad indexes the inputs as the
    custom op's does). The module provides

        CELL                        "rnn", "lstm" or "gru"
        PUBLIC                      how many of the forward's outputs the caller sees
        forward(be, *inputs)        all outputs (public ones, then the tensors saved for backward)
        setup_context(ctx, inputs, outputs)
        input_grads(ctx, grads, bptt, differentiable) -> the gradient of every input; it calls
                                    bptt(*the <cell>_bwd op's arguments, sums=bool) -> (the op's
                                    outputs, the step sums or None: see backend_bptt)
        bptt(be, *args, sums=False) the backend's BPTT (the <cell>_bwd op's arguments, backend
                                    excluded) -> (its outputs, the step sums or None)
        tangents(ctx, tangents)     forward mode: every output's tangent from the inputs' (jvp)

    — the same functions its custom ops register, so both paths compute the same thing.

    Higher order: when the backward itself is differentiated (create_graph=True, or a gradient
    arriving for a tensor kept for backward, which only a second-order pass produces), the BPTT runs
    as torch ops (the reference backend's, extended to those gradients) on the saved outputs, whose
    history leads back here: second-order gradients are exact. The first-order backward stays the
    backend's fused BPTT."""

    @staticmethod
    def forward(*args):
        *inputs, cell = args
        be = _backends.select(inputs[-1], inputs[0].device, inputs[0].dtype, cell.CELL)
        return cell.forward(be, *inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        *inputs, cell = inputs
        cell.setup_context(ctx, inputs, output)
        ctx.cell = cell
        ctx.be = _backends.select(inputs[-1], inputs[0].device, inputs[0].dtype, cell.CELL)
        # no zero-filled gradients for the outputs kept for backward (a [T, B, 4H] fill per call
        # otherwise: 1 ms of a 21 ms GRU training step at (32, 128, 128, 128, 256) on the 2-core
        # VM); input_grads stands in zeros where a public output got no gradient
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, *grads):
        cell, be = ctx.cell, ctx.be

        def bptt(*args, sums=False):
            return cell.bptt(be, *args[:-1], sums=sums)  # the last argument names the backend: already resolved

        # also when a torch.func transform (vmap of the backward, as jacrev does) hands in wrapped
        # tensors: the torch-op BPTT is transformable, the fused kernels are not
        differentiable = (torch.is_grad_enabled() or any(g is not None for g in grads[cell.PUBLIC:])
                          or any(g is not None and torch._C._functorch.is_functorch_wrapped_tensor(g) for g in grads))
        return tuple(cell.input_grads(ctx, grads, bptt, differentiable)) + (None,)

    @staticmethod
    def jvp(ctx, *tangents):
        """Forward-mode AD (torch.func.jvp, forward_ad): the tangents of every output, propagated
        step by step through torch ops from what the forward saved."""
        return ctx.cell.tangents(ctx, tangents[:-1])

    @staticmethod
    def vmap(info, in_dims, *args):
        """torch.func.vmap: the op once per vmapped slice, outputs stacked along dim 0. (Folding the
        vmapped dimension into the batch would be one call, but only where every weight is shared;
        the loop is right for per-sample weights too.) Its backward, vmapped by torch.func, runs the
        differentiable BPTT (see backward)."""
        *inputs, cell = args
        *dims, _ = in_dims
        results = []
        for i in range(info.batch_size):
            sliced = [a.select(d, i) if d is not None else a for a, d in zip(inputs, dims)]
            results.append(EagerOp.apply(*sliced, cell))
        outputs = tuple(torch.stack(parts) for parts in zip(*results))
        return outputs, (0,) * len(outputs)


class _SaveRecorder:
    """What a cell's setup_context sees in FusedInputOp: the tensors it saves are recorded (the op
    saves them with its own), every other attribute goes to the real context."""

    def __init__(self, ctx):
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "saved", ())

    def save_for_backward(self, *tensors):
        object.__setattr__(self, "saved", tensors)

    def save_for_forward(self, *tensors):
        pass  # FusedInputOp has no forward-mode formula: the modules never take it under forward AD

    def __setattr__(self, name, value):
        setattr(self._ctx, name, value)


class _OpView:
    """A FusedInputOp context as the cell's input_grads reads it: the cell's own saved tensors and
    needs_input_grad in its op's input order (xp first); anything else from the real context.
    wants_recurrent_tail: the weight gradients are FusedInputOp's joint pass, and a cell whose dW_hh
    reads other rows than dA's for some of its gates (the GRU's n gate) leaves them as recurrent_tail.
    wants_step_sums: the outer term's gradients are FusedInputOp's (from the step sums): the cell
    asks its BPTT for them and leaves them as step_sums ([B, G], the GRU's [B, 4H] = [dGx | dhn])."""

    wants_recurrent_tail = wants_step_sums = False
    recurrent_tail = step_sums = None

    def __init__(self, ctx, saved, needs, wants_recurrent_tail=False, wants_step_sums=False):
        self._ctx, self.saved_tensors, self.needs_input_grad = ctx, saved, needs
        self.wants_recurrent_tail, self.wants_step_sums = wants_recurrent_tail, wants_step_sums

    def __getattr__(self, name):
        return getattr(self._ctx, name)


def outer_term(image, w_img, bias, batch: int):
    """What the recurrence adds to every step's gates outside its recurrent product: the image term
    (one GEMM per sequence when the image is static, [B, V] -> [B, G]; per step [T, B, V] -> [T, B, G])
    with the biases that sit outside that product, summed, riding with it, since the recurrence adds
    it in its elementwise pass anyway (a bias in the big input GEMM costs a broadcast copy over all
    T*B*G outputs: 14.5 ms of 430 at (64, 256, 256, 512, 512) on the 2-core CPU for the RNN), or the
    bias alone as [batch, G]. None where there is neither."""
    if image is not None:
        return torch.nn.functional.linear(image, w_img, bias)
    return None if bias is None else bias.expand(batch, -1)


def summed_bias(b_ih, b_hh, inner: int = 0):
    """The biases outside the recurrent product, summed ([G]; None without bias): b_ih + b_hh, or
    with `inner` > 0 the last `inner` entries of b_hh left out (they sit inside the product: the
    GRU's b_hn), b_ih's own there."""
    if b_ih is None:
        return None
    if inner == 0:
        return b_ih + b_hh
    n = b_ih.shape[0] - inner
    return torch.cat([b_ih[:n] + b_hh[:n], b_ih[n:]])


class FusedInputOp(torch.autograd.Function):
    """EagerOp with the input product and the outer term inside the recurrence, for the modules'
    float32 CPU training: ``FusedInputOp.apply(x, w_ih, image, w_img, b_ih, b_hh, *inputs, cell,
    engine)``, where the inputs are the <cell>_fwd op's after xp with None in the image_term slot
    (cell.IMAGE_SLOT, counted from w_hh) and, for a cell with a bias inside its recurrent product
    (cell.INNER_BIAS_SLOT: the GRU's b_hn, b_hh's last H entries), None there too, and ``engine``
    the backend's Engine, returns what EagerOp returns for xp = x @ w_ih^T and image_term =
    outer_term(image, w_img, summed_bias(b_ih, b_hh)). The forward is the engine's fused training
    forward (cell.fused_forward: [x_t | h_{t-1}] @ [W_ih; W_hh] per step, K = I + H, saving what BPTT
    reads; no projected input written or read back). Backward: the cell's input_grads (the engine's
    BPTT) gives dL/dxp and the image term's gradient (the step sums where static), then dx = dxp @
    W_ih and [dW_ih | dW_hh] = dxp^T [x | h_{t-1}] in one pass on the engine (cell.recurrent_operands
    names h0 and out; the GRU's input_grads leaves the rows its dW_hh reads instead of dA's for the n
    gate as recurrent_tail, asked by wants_recurrent_tail), and the image's, W_img's and the biases'
    gradients from the image term's. One autograd node for all of it: the image GEMM, the bias sum
    and their three backward nodes apart cost 70 us of a 280 us training step of an RNN at
    (2, 2, 8, 4, 16) and 0.2-0.4 ms of 11 at (24, 100, 96, 64, 320) (2-core Zen 4 EPYC).
    Higher order as EagerOp: the BPTT as torch ops on the saved tensors, and the products as torch
    ops, so that the gradients have a history. Not under forward AD, a torch.func transform or
    torch.compile (the modules choose it only outside them): so the forward takes its context itself
    (torch's Function.apply binds the arguments to the forward's signature by inspection on every
    call where a separate setup_context is defined)."""

    @staticmethod
    def forward(ctx, x, w_ih, image, w_img, b_ih, b_hh, *args):
        *inputs, cell, engine = args
        H = inputs[0].shape[1]  # w_hh [G, H]
        inner = H if cell.INNER_BIAS_SLOT is not None else 0
        # static (or no) image: the term in one engine call (torch's add and addmm were two ops on
        # code the step's kernels push out of the caches: ~50 us each inside a step, 5 alone)
        ctx.static = image is None or image.dim() == 2
        if ctx.static:
            inputs[cell.IMAGE_SLOT] = engine.outer_term(image, w_img, b_ih, b_hh, inner, x.shape[-2])
        else:
            inputs[cell.IMAGE_SLOT] = outer_term(image, w_img, summed_bias(b_ih, b_hh, inner), x.shape[-2])
        if inner and b_hh is not None:
            inputs[cell.INNER_BIAS_SLOT] = b_hh[b_hh.shape[0] - H:]
        output = cell.fused_forward(engine, x, w_ih, *inputs)
        recorder = _SaveRecorder(ctx)
        cell.setup_context(recorder, (None, *inputs), output)
        ctx.save_for_backward(*recorder.saved, x, w_ih, image, w_img)
        ctx.cell, ctx.engine, ctx.hidden = cell, engine, H
        ctx.be = _backends.select(inputs[-1], x.device, x.dtype, cell.CELL)
        ctx.set_materialize_grads(False)  # as EagerOp
        return output

    @staticmethod
    def backward(ctx, *grads):
        cell, be = ctx.cell, ctx.be
        *saved, x, w_ih, image, w_img = ctx.saved_tensors
        need_x, need_w_ih, need_img, need_w_img, need_b_ih, need_b_hh, *needs = ctx.needs_input_grad[:-2]
        slot, inner_slot = cell.IMAGE_SLOT, cell.INNER_BIAS_SLOT
        need_term = need_img or need_w_img or need_b_ih or need_b_hh

        def bptt(*args, sums=False):
            return cell.bptt(be, *args[:-1], sums=sums)  # the last argument names the backend: already resolved

        differentiable = (torch.is_grad_enabled() or any(g is not None for g in grads[cell.PUBLIC:])
                          or any(g is not None and torch._C._functorch.is_functorch_wrapped_tensor(g) for g in grads))
        # first order with a static term: its inputs' gradients from the step sums in one engine call
        from_sums = need_term and not differentiable and ctx.static and be.cells[cell.CELL].step_sums
        needs[slot] = need_term and not from_sums
        if inner_slot is not None:
            needs[inner_slot] = need_b_hh and not from_sums
        # dW_ih and dW_hh in one pass over dA on the engine (first order): input_grads leaves dW_hh
        joint = not differentiable and need_w_ih and needs[0]
        view = _OpView(ctx, saved, (need_x or need_w_ih, needs[0] and not joint, *needs[1:]), joint, from_sums)
        d_xp, d_w_hh, *rest = cell.input_grads(view, grads, bptt, differentiable)
        dx = dw = None
        if need_x:
            dx = d_xp.matmul(w_ih) if differentiable else ctx.engine.linear(d_xp, w_ih.contiguous(), False)
        if joint:
            # the GRU's input_grads leaves view.recurrent_tail: its dW_hh's n rows read d(W_hn h + b_hn)
            dw, d_w_hh = ctx.engine.weight_grad(d_xp, x, *cell.recurrent_operands(saved), tail=view.recurrent_tail)
        elif need_w_ih:
            dw = input_weight_grad(d_xp, x, None if differentiable else ctx.engine)
        d_img = d_w_img = d_b_ih = d_b_hh = None
        if from_sums:
            S, inner = view.step_sums, 0 if inner_slot is None else ctx.hidden
            d_w_img, d_b_ih, d_b_hh = ctx.engine.outer_grad(S, image if need_w_img else None, inner,
                                                            need_b_ih or need_b_hh)
            if need_img:
                d_img = ctx.engine.linear(S[:, :S.shape[1] - inner], w_img.contiguous(), False)
            return (dx, dw, d_img, d_w_img, d_b_ih if need_b_ih else None, d_b_hh if need_b_hh else None, d_w_hh,
                    *rest, None, None)
        # the outer term's inputs from its gradient (the step sums where static: [B, G])
        d_term = rest[slot - 1]
        if need_img:
            d_img = d_term.matmul(w_img)
        if need_w_img:
            d_w_img = d_term.reshape(-1, d_term.shape[-1]).t().mm(image.reshape(-1, image.shape[-1]))
        if need_b_ih or need_b_hh:
            d_b = d_term.reshape(-1, d_term.shape[-1]).sum(0)
            d_b_ih = d_b if need_b_ih else None
            if need_b_hh:
                d_b_hh = d_b if inner_slot is None else torch.cat([d_b[:d_b.shape[0] - ctx.hidden], rest[inner_slot - 1]])
        rest[slot - 1] = None
        if inner_slot is not None:
            rest[inner_slot - 1] = None
        return (dx, dw, d_img, d_w_img, d_b_ih, d_b_hh, d_w_hh, *rest, None, None)
