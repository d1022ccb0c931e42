"""torch.library registration (opcheck), torch.compile with no graph break, autocast, and DDP, for
every cell (RNN, LSTM, GRU)."""
import os
import sys
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mmrnn_ext
from conftest import require
from op_cases import make_inputs

I, H, V = 5, 16, 3
CELLS = ["rnn", "lstm", "gru"]
MODULES = {"rnn": mmrnn_ext.RNN, "lstm": mmrnn_ext.LSTM, "gru": mmrnn_ext.GRU}
CELL_MODULES = {"rnn": mmrnn_ext.RNNCell, "lstm": mmrnn_ext.LSTMCell, "gru": mmrnn_ext.GRUCell}


@pytest.mark.parametrize("image", [None, "static", "step"], ids=["noimg", "static", "step"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
def test_opcheck(cpu_backend, image, lengths):
    xp, w, h0, img, lens = make_inputs(4, 3, 7, image, torch.float64, lengths=lengths)
    torch.library.opcheck(torch.ops.mmrnn.rnn_fwd.default, (xp, w, h0, img, lens, "tanh", cpu_backend))
    out, h_last = torch.ops.mmrnn.rnn_fwd(xp, w, h0, img, lens, "tanh", cpu_backend)
    args = (torch.randn_like(out), torch.randn_like(h_last), out.detach(), h0.detach(), w.detach(), lens, "tanh", cpu_backend)
    torch.library.opcheck(torch.ops.mmrnn.rnn_bwd.default, args)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("image", [None, "static", "step"], ids=["noimg", "static", "step"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
def test_opcheck_gated(cpu_backend, cell, image, lengths):
    from test_gated_ops import make_inputs as gated_inputs

    args, lens = gated_inputs(cell, 4, 3, 7, image, torch.float64, lengths=lengths)
    fwd, bwd = getattr(torch.ops.mmrnn, f"{cell}_fwd"), getattr(torch.ops.mmrnn, f"{cell}_bwd")
    torch.library.opcheck(fwd.default, (*args, lens, cpu_backend))
    outs = [o.detach() for o in fwd(*args, lens, cpu_backend)]
    d = [a.detach() if a is not None else None for a in args]
    if cell == "lstm":
        out, h, c, c_all, gates = outs
        bwd_args = (torch.randn_like(out), torch.randn_like(h), torch.randn_like(c), out, c_all, gates, d[2], d[3], d[1])
    else:
        out, h, gates = outs
        bwd_args = (torch.randn_like(out), torch.randn_like(h), out, gates, d[3], d[1])
    torch.library.opcheck(bwd.default, (*bwd_args, lens, cpu_backend))


class Tagger(torch.nn.Module):
    """A small multimodal model: a 2-layer bidirectional image RNN, LSTM or GRU and a head."""

    def __init__(self, backend, cell="rnn"):
        super().__init__()
        self.rnn = MODULES[cell](I, H, num_layers=2, bidirectional=True, batch_first=True, image_size=V, backend=backend)
        self.head = torch.nn.Linear(2 * H, 2)

    def forward(self, x, image, lengths):
        out, h_n = self.rnn(x, image=image, lengths=lengths)
        states = h_n if isinstance(h_n, tuple) else (h_n,)
        return self.head(out).sum(1) + sum(s.sum(0).sum(-1, keepdim=True) for s in states)


def _inputs(B=3, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, I, generator=g), torch.randn(B, V, generator=g),
            torch.randint(1, T + 1, (B,), generator=g))


@pytest.mark.parametrize("cell", CELLS)
def test_fullgraph_compile_has_no_graph_break(cpu_backend, cell):
    torch.manual_seed(0)
    model = Tagger(cpu_backend, cell)
    x, img, lens = _inputs()
    explanation = torch._dynamo.explain(model)(x, img, lens)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("cell", CELLS)
def test_compiled_model_matches_eager_forward_and_gradients(cell):
    require("cpp")
    torch.manual_seed(0)
    model = Tagger("auto", cell)
    compiled = torch.compile(model, fullgraph=True)
    x, img, lens = _inputs()
    results = []
    for m in (model, compiled):
        m.zero_grad(set_to_none=True)
        y = m(x, img, lens)
        y.square().sum().backward()
        results.append((y.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # torch.compile of every cell
@pytest.mark.parametrize("cell", CELLS)
def test_compiled_reference_and_cpp_agree(cell):
    require("cpp")
    x, img, lens = _inputs()
    outs = []
    for backend in ("reference", "cpp"):
        torch.manual_seed(0)
        torch._dynamo.reset()
        model = Tagger(backend, cell)
        outs.append(torch.compile(model, fullgraph=True, backend="aot_eager")(x, img, lens))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # torch.compile at many shapes
@pytest.mark.parametrize("cell", CELLS)
def test_dynamic_shapes_compile_once(cpu_backend, cell):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = Tagger(cpu_backend, cell)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    # sizes distinct from I, V, H: dynamo gives equal sizes one symbol (duck sizing); T = 2 (a
    # [T - 1] slice's contiguity test once made a guard T - 1 != 1) compiles nothing new either
    compiles = []
    for B, T in [(2, 6), (4, 7), (7, 2), (8, 11)]:
        x, img, lens = _inputs(B, T, seed=B)
        y = compiled(x, img, lens)
        torch.testing.assert_close(y, model(x, img, lens), atol=1e-5, rtol=1e-5)
        y.sum().backward()
        compiles.append(counter.frame_count)
    # the first call may compile twice (dynamo restarts its analysis once); new sizes add nothing
    assert compiles[1:] == compiles[:1] * 3, f"backend compilations after each call: {compiles}"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("module", ["layer", "cell"])
def test_autocast_bf16_on_cpu(cell, module):
    torch.manual_seed(0)
    m = MODULES[cell](I, H, image_size=V) if module == "layer" else CELL_MODULES[cell](I, H, image_size=V)
    x = torch.randn(6, 3, I) if module == "layer" else torch.randn(3, I)
    img = torch.randn(3, V)

    def first(y):  # the output sequence of a layer, h' of a cell
        y = y[0] if module == "layer" or isinstance(y, tuple) else y
        return y

    y32 = first(m(x, image=img))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = first(m(x, image=img))
    # the dtype torch's own module returns there (test_edges.py compares every output and state)
    full = cell == "gru" or (cell == "lstm" and module == "cell")
    assert y.dtype == (torch.float32 if full else torch.bfloat16)
    rel = ((y.double() - y32.double()).norm() / y32.double().norm()).item()
    print(f"bf16 autocast vs float32: relative error {rel:.2e}")
    assert rel <= 1e-2
    y.float().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("cell", CELLS)
def test_autocast_dtype_vs_torch(cell):
    """Every cell returns what torch's does under CPU bf16 autocast: bf16 for RNN and LSTM; float32
    for the GRU (torch's computes per step in bf16 and returns float32; so does ours)."""
    ref = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](I, H)
    ours = MODULES[cell](I, H)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, I)
    expected_torch = torch.float32 if cell == "gru" else torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_o, h_o = ours(x)
        try:
            out_r, h_r = ref(x)
        except RuntimeError as exc:  # oneDNN has no bf16 LSTM for CPUs without AVX-512 (e.g. AMD Zen 2)
            if "primitive descriptor" not in str(exc):
                raise
            out_r, h_r = None, None
    assert out_o.dtype == expected_torch
    assert all(a.dtype == expected_torch for a in (h_o if isinstance(h_o, tuple) else (h_o,)))
    if out_r is not None:  # the dtypes above are torch's own where torch runs here
        assert out_r.dtype == expected_torch
        assert all(b.dtype == expected_torch for b in (h_r if isinstance(h_r, tuple) else (h_r,)))


# --- DistributedDataParallel, 2 processes, gloo -------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, path, backend, cell):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = Tagger(backend, cell).double()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    x, img, lens = (t.double() if t.is_floating_point() else t for t in _inputs(B=4, T=6))
    rows = slice(2 * rank, 2 * rank + 2)
    loss = ddp(x[rows], img[rows], lens[rows]).square().mean()
    loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, path)
    dist.barrier()  # both ranks are done with gloo before either leaves
    # Leave without gloo's teardown: on a loaded 2-core machine its destructor races the other rank's
    # exit and aborts the process ("terminate called without an active exception") after the work
    # is done and saved. Exit code 0 still means this rank's work ran to the end.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.slow  # two processes per cell
@pytest.mark.parametrize("cell", CELLS)
def test_ddp_gloo_two_processes_match_single_process(cpu_backend, cell, tmp_path):
    path = str(tmp_path / "grads.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), path, cpu_backend, cell), nprocs=2, join=True)
    ddp_grads = torch.load(path, weights_only=True)
    torch.manual_seed(0)
    model = Tagger(cpu_backend, cell).double()
    x, img, lens = (t.double() if t.is_floating_point() else t for t in _inputs(B=4, T=6))
    model(x, img, lens).square().mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: {m}")


# --- the same on a GPU (bench/gpu_check.sh runs these) ------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("image", [None, "static", "step"], ids=["noimg", "static", "step"])
def test_gpu_opcheck(image):
    xp, w, h0, img, lens = make_inputs(4, 3, 32, image, torch.float32, device="cuda", lengths=True)
    torch.library.opcheck(torch.ops.mmrnn.rnn_fwd.default, (xp, w, h0, img, lens.cuda(), "tanh", "triton"))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("image", [None, "static", "step"], ids=["noimg", "static", "step"])
def test_gpu_opcheck_gated(cell, image):
    from test_gated_ops import make_inputs as gated_inputs

    args, lens = gated_inputs(cell, 4, 3, 32, image, torch.float32, lengths=True)
    args = [None if a is None else a.cuda() for a in args]
    torch.library.opcheck(getattr(torch.ops.mmrnn, f"{cell}_fwd").default, (*args, lens.cuda(), "triton"))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_fullgraph_compile_matches_eager(cell):
    torch.manual_seed(0)
    model = Tagger("triton", cell).cuda()
    x, img, lens = (t.cuda() for t in _inputs())
    explanation = torch._dynamo.explain(model)(x, img, lens)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x, img, lens), model(x, img, lens),
                               atol=1e-4, rtol=1e-4)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_autocast(cell, dtype):
    torch.manual_seed(0)
    m = MODULES[cell](I, H, image_size=V).cuda()
    x, img = torch.randn(6, 3, I, device="cuda"), torch.randn(3, V, device="cuda")
    y32, _ = m(x, image=img)
    with torch.autocast("cuda", dtype=dtype):
        y, _ = m(x, image=img)
    assert y.dtype == dtype
    assert ((y.double() - y32.double()).norm() / y32.double().norm()).item() <= 1e-2
    y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in m.parameters())


def _nccl_worker(rank, world, port, path):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    torch.manual_seed(0)
    model = Tagger("triton").cuda()
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank])
    x, img, lens = (t.cuda() for t in _inputs(B=4, T=6))
    ddp(x, img, lens).square().mean().backward()
    if rank == 0:
        torch.save({n: p.grad.cpu() for n, p in model.named_parameters()}, path)
    dist.destroy_process_group()


@gpu
@pytest.mark.gpu
def test_gpu_ddp_nccl(tmp_path):
    """One process per GPU (a single-GPU machine runs a world of one: NCCL cannot put two ranks on one device)."""
    world = torch.cuda.device_count()
    path = str(tmp_path / "grads.pt")
    mp.spawn(_nccl_worker, args=(world, _free_port(), path), nprocs=world, join=True)
    grads = torch.load(path, weights_only=True)
    torch.manual_seed(0)
    model = Tagger("triton").cuda()
    x, img, lens = (t.cuda() for t in _inputs(B=4, T=6))
    model(x, img, lens).square().mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad.cpu(), atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # torch.compile at many shapes
@pytest.mark.parametrize("cell", CELLS)
def test_dynamic_compile_specialises_only_size_one(cell):
    """The README's promise: with dynamic=True, batch 1 and length 1 each compile once more (torch
    specialises sizes 0 and 1); after that, no size compiles anything new."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Tagger("auto", cell)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    counts = []
    for B, T in [(4, 6), (6, 2), (1, 7), (4, 1), (1, 1), (1, 9), (6, 1), (7, 8)]:
        x, img, lens = _inputs(B, T, seed=B + T)
        y = compiled(x, img, lens)
        torch.testing.assert_close(y, model(x, img, lens), atol=1e-5, rtol=1e-5)
        y.sum().backward()  # the backward's graph holds guards of its own
        counts.append(counter.frame_count)
    first = counts[0]
    assert counts[1] == first, f"T = 2 recompiled: {counts}"
    assert counts[2] <= first + 1 and counts[3] <= counts[2] + 1, f"B = 1 / T = 1 compiled more than once each: {counts}"
    assert counts[4:] == [counts[4]] * 4 and counts[4] <= counts[3] + 1, f"compiles after each call: {counts}"


def test_torch_gru_under_cpu_autocast_computes_bf16_returns_float32():
    """What the README says of torch's nn.GRU under CPU autocast (our GRU returns the same dtypes):
    its products and gates run in bfloat16, its output and h_n come back float32."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                self.seen.add((func.overloadpacket.__name__, out.dtype))
            return out

    torch.manual_seed(0)
    gru, x = torch.nn.GRU(8, 16), torch.randn(5, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), Ops() as ops:
        y, h = gru(x)
    assert ("addmm", torch.bfloat16) in ops.seen and ("sigmoid_", torch.bfloat16) in ops.seen
    assert y.dtype == h.dtype == torch.float32
    assert (y - gru(x)[0]).abs().max().item() > 1e-4  # bf16 rounding, not a float32 computation
