"""The package's layout rules: no two modules of mmrnn_ext import each other (directly or round a
longer loop, function-level imports included), the error types sit at the bottom, and every file
of mmrnn-bench says its concern on its first line."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "mmrnn_ext")


def _modules() -> dict:
    """{dotted name: path} of every module of mmrnn_ext in the tree (a package by its __init__)."""
    found = {}
    for folder, _, files in os.walk(PKG):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def _imports(modules: dict) -> dict:
    """{module: the package modules it imports}: `from P import name` counts as importing P.name when
    that is a module, else P; relative imports resolved."""
    graph = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod.split(".") if path.endswith("__init__.py") else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[mod].update(t for t in targets if t in modules and t != mod)
    return graph


def _cycles(graph: dict) -> list:
    cycles, state, stack = [], {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def test_no_import_cycle():
    cycles = _cycles(_imports(_modules()))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_errors_at_the_bottom():
    graph = _imports(_modules())
    assert graph["mmrnn_ext.errors"] == set()
    assert "mmrnn_ext.errors" in graph["mmrnn_ext._backends"] and "mmrnn_ext.ops.common" not in graph["mmrnn_ext._backends"]
    import mmrnn_ext
    from mmrnn_ext import errors, ops

    assert mmrnn_ext.InputError is errors.InputError is ops.InputError


def test_every_bench_file_says_its_concern():
    folder = os.path.join(PKG, "bench")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            first = open(os.path.join(folder, name)).readline()
            assert first.startswith('"""') and len(first.strip('"\n ')) > 20, (name, first)


def test_only_the_dispatch_point_knows_backends():
    """No module but _backends calls its private probes (_cpp, _kernels, _cpp_backend,
    _triton_backend) or compares a chosen backend's name: what a backend offers is asked of it."""
    import re

    offenders = []
    for mod, path in _modules().items():
        if mod == "mmrnn_ext._backends":
            continue
        text = open(path).read()
        for pattern in (r"_backends\._(cpp|kernels|cpp_backend|triton_backend)\(", r"\.name == [\"']cpp[\"']",
                        r"in \([\"']auto[\"'], [\"']cpp[\"']\)"):
            offenders += [f"{mod}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert not offenders, offenders
