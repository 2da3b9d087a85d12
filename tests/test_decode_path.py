"""The shape of the code a decode step runs through: a short path from the attention function to the kernel, and
no import circle through the attention function."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

import butler_cache
from butler_cache import ButlerCache, ButlerConfig, ButlerPredictor
from butler_cache.compat import cache_argument
from butler_cache.kernels import NUMBA_AVAILABLE, TRITON_AVAILABLE

from .conftest import random_batch, tiny_model

PACKAGE = Path(butler_cache.__file__).resolve().parent  # src/butler_cache
KERNELS = Path(butler_cache.kernels.__file__).resolve().parent  # kernels/ (installed as butler_cache.kernels)
INTEGRATIONS = KERNELS.parent / "integrations"


def _modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name."""
    roots = {"butler_cache": PACKAGE, "butler_cache.kernels": KERNELS, "butler_cache.integrations": INTEGRATIONS}
    modules = {}
    for prefix, root in roots.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([prefix, *parts])
            if not (prefix == "butler_cache" and name.startswith(("butler_cache.kernels", "butler_cache.integrations"))):
                modules[name] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports anywhere (functions included), leaving out ``if TYPE_CHECKING:`` and its
    own ancestor packages (always imported before it, so never part of a circle)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in modules else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in modules and m != name and not name.startswith(m + ".")}


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(component)

    for v in graph:
        if v not in index:
            connect(v)
    return result


def test_the_import_graph_has_no_circle_through_the_decode_path():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "butler_cache.cache" in graph["butler_cache"] and graph["butler_cache.attention"]  # the parser sees imports
    decode_path = {"butler_cache.attention", "butler_cache.hooks", "butler_cache.cache", "butler_cache.layer",
                   "butler_cache.policies", "butler_cache.policies.base", "butler_cache.decode"}
    circles = [sorted(c) for c in _cycles(graph) if c & decode_path]
    assert not circles


def _stack_files_at(monkeypatch, module, function: str, run) -> list[list[str]]:
    """The package files on the call stack, from `butler_attention_forward` down, at each call of
    ``module.function`` while ``run()`` runs (outermost first, consecutive frames of one file counted once)."""
    stacks = []
    original = getattr(module, function)

    def recording(*args, **kwargs):
        files = []
        for frame in reversed(inspect.stack(context=0)[1:]):
            path = Path(frame.filename).resolve()
            inside = path.is_relative_to(PACKAGE) or path.is_relative_to(KERNELS)
            if frame.function == "butler_attention_forward":
                files = []
            shown = str(path.relative_to(PACKAGE if path.is_relative_to(PACKAGE) else KERNELS.parent)) if inside else ""
            if inside and (not files or files[-1] != shown):
                files.append(shown)
        stacks.append([*files, str(Path(inspect.getfile(original)).resolve().relative_to(KERNELS.parent))])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, function, recording)
    run()
    return stacks


def _kernel(backend: str, fused: bool):
    """The module and function a decode step's attention ends in, per backend."""
    if backend == "numba" and fused:
        from butler_cache.kernels.decode_step import cpu as decode_step_cpu

        return decode_step_cpu, "decode_step_flat"
    if backend == "numba":
        from butler_cache.kernels.sparse_attention import cpu

        return cpu, "sparse_decode_attention_cpu"
    if backend == "triton":
        from butler_cache.kernels.sparse_attention import decode

        return decode, "sparse_decode_attention"
    from butler_cache.decode import torch_backend

    return torch_backend, "sparse_decode_attention_torch"


@pytest.mark.parametrize(
    "backend, fused",
    [("torch", False), pytest.param("numba", True, marks=pytest.mark.skipif(not NUMBA_AVAILABLE, reason="numba")),
     pytest.param("numba", False, marks=pytest.mark.skipif(not NUMBA_AVAILABLE, reason="numba")),
     pytest.param("triton", False, marks=pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton"))],
    ids=["torch", "numba-fused", "numba-separate", "triton"],
)
def test_a_decode_step_reaches_its_kernel_through_four_files_or_fewer(monkeypatch, backend, fused):
    """From the attention function to the kernel that attends: attention.py -> layer.py -> the backend -> the
    kernel (the recorded stats of the separate numba path force it past the fused step)."""
    model = tiny_model("qwen2", seed=4, num_attention_heads=6, num_key_value_heads=2)
    torch.manual_seed(0)
    predictor = ButlerPredictor(ButlerConfig.for_model(model))
    ids, _ = random_batch(1, 30, seed=6)
    cache = ButlerCache(model, predictor, token_budget=12, sink_tokens=2, local_window=2, backend=backend,
                        record_stats=backend == "numba" and not fused)
    module, function = _kernel(backend, fused)

    def run():
        model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, **cache_argument(cache))

    stacks = _stack_files_at(monkeypatch, module, function, run)
    assert stacks, f"no decode step reached {function}"
    for files in stacks:
        assert files[0] == "attention.py" and files[1] == "layer.py", files
        assert len(files) <= 4, files
