"""Architecture checks: the package's import graph has no cycle (imports inside functions included),
no module is much over 500 lines, ``describe`` reads headers of the requested layers only (never a
weight file), and an activation is added by a class and one table entry."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import random_transcoder
from format_fixtures import (
    write_gemma_scope,
    write_gemma_scope2_clt,
    write_gemma_scope2_plt,
    write_saelens,
    write_sparsify,
)

from sparse_clt_hf import CrossLayerTranscoder, TranscoderConfig
from sparse_clt_hf.activations import ACTIVATIONS, Activation
from sparse_clt_hf.formats import describe
from sparse_clt_hf.io.sources import LocalSource

PACKAGE = Path(__file__).resolve().parent.parent / "sparse_clt_hf"
MAX_LINES = 520
LINE_LIMIT_EXEMPT: set[str] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Package modules imported anywhere in ``tree`` (functions included, ``if TYPE_CHECKING:`` excluded)."""
    out: set[str] = set()
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from pkg import module`` depends on that module; other names on ``pkg`` itself (parent
            # packages, which Python initialises first, are not counted, as for ``import a.b.c``)
            subs = {f"{target}.{alias.name}" for alias in node.names}
            out.update(subs & known)
            if subs - known:
                out.add(target)
    return {m for m in out if m in known and m != module}


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    return {
        name: _imports(ast.parse(path.read_text()), name, path.name == "__init__.py", known)
        for name, path in files.items()
    }


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert "sparse_clt_hf.formats.circuit_tracer" in graph and graph["sparse_clt_hf.transcoder"]
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_cycle_finder_sees_imports_inside_functions():
    a = ast.parse("def f():\n    from .b import x\n")
    assert _imports(a, "pkg.a", False, {"pkg.a", "pkg.b"}) == {"pkg.b"}
    assert _find_cycle({"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}) == ["pkg.a", "pkg.b", "pkg.a"]


def test_layers_point_one_way():
    graph = import_graph()
    low = [m for m in graph if m.startswith(("sparse_clt_hf.io.sources", "sparse_clt_hf.io.refs", "sparse_clt_hf.formats"))]
    high = {"sparse_clt_hf.transcoder", "sparse_clt_hf.loading", "sparse_clt_hf.attach", "sparse_clt_hf.hub"}
    for module in low:
        assert not graph[module] & high, (module, graph[module] & high)


def test_no_module_is_much_over_500_lines():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES and p.name not in LINE_LIMIT_EXEMPT
    }
    assert not long, long


# ---------------------------------------------------------------------- describe reads no weights
class HeaderOnlySource(LocalSource):
    """A folder whose weight files may not be fetched (downloaded); headers are recorded."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.headers: list[str] = []

    def fetch(self, path: str) -> Path:
        if path.endswith((".safetensors", ".npz", ".pt")):
            raise AssertionError(f"describe fetched the weight file {path}")
        return super().fetch(path)

    def header(self, path: str):
        self.headers.append(path)
        return super().header(path)

    def open_range(self, path: str):  # npz: the zip directory and array headers, read on demand
        self.headers.append(path)
        return open(self.root / path, "rb")


def _saelens(root: Path, layers: list[int], d: int, m: int) -> None:
    for layer in layers:
        write_saelens(root / f"blocks.{layer}.hook_resid_pre", layer, d, m)


@pytest.mark.parametrize(
    "fmt,write",
    [
        ("saelens", lambda p: _saelens(p, [0, 3, 5], 16, 48) or p),
        ("gemma_scope2", lambda p: write_gemma_scope2_plt(p, [0, 3, 5], 16, 48) and p),
        ("gemma_scope2", lambda p: write_gemma_scope2_clt(p, 6, 16, 48) and p / "clt/width_262k_l0_medium"),
        ("gemma_scope", lambda p: write_gemma_scope(p, [0, 3, 5], 16, 48) and p),
        ("sparsify", lambda p: write_sparsify(p, [f"layers.{i}.mlp" for i in (0, 3, 5)], 16, 48, transcode=True) and p),
    ],
)
def test_describe_reads_only_the_requested_layers_headers(tmp_path, fmt, write):
    root = write(tmp_path)
    src = HeaderOnlySource(root)
    desc = describe(src, layers=[3])
    assert (desc.format, desc.layers, desc.d_model, desc.n_features) == (fmt, [3], 16, [48])
    assert len(src.headers) == 1 and "3" in src.headers[0], src.headers
    every = describe(HeaderOnlySource(root))
    assert every.layers[:2] == [0, 1 if every.kind == "clt" else 3] and every.dtype == "float32"


# ---------------------------------------------------------------------- a new activation
class Softplus0(Activation):
    """A test activation: ``relu(z) ** 2`` (element-wise: the base class gives the blocked kernel form)."""

    name = "relu_squared"

    def dense(self, z, threshold=None, k=None):
        return torch.relu(z).square()


def test_an_activation_is_a_class_and_a_table_entry(tmp_path, monkeypatch):
    monkeypatch.setitem(ACTIVATIONS, Softplus0.name, Softplus0())
    base = random_transcoder(d=16, layers=(0, 1), widths=[40, 40], seed=4)
    cfg = TranscoderConfig.from_dict({**base.config.to_dict(), "activation": "relu_squared"})
    tc = CrossLayerTranscoder(cfg, {i: base.encoder(i) for i in base.layers})
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(0))
    dense = tc.encode(x, 1)
    torch.testing.assert_close(dense, torch.relu(base.pre_activations(x, 1)).square())
    values, indices, l0 = tc.encode_sparse(x, 1, top_k=5, chunk_size=4)
    ref_v, ref_i = dense.topk(5, dim=-1)
    torch.testing.assert_close(values, ref_v)
    assert torch.equal(indices, ref_i.int().masked_fill(ref_v == 0, -1))
    assert torch.equal(l0, (dense != 0).sum(-1).int())
    back = CrossLayerTranscoder.from_pretrained(tc.save_pretrained(tmp_path / "native"))
    assert back.config.activation == "relu_squared"
    torch.testing.assert_close(back.encode(x, 1), dense)


# ---------------------------------------------------------------------- the load path and stats
def test_load_for_model_detects_and_describes_once(tmp_path, monkeypatch):
    from tiny_models import tiny_model

    from sparse_clt_hf import formats
    from sparse_clt_hf.loading import load_for_model

    folder = random_transcoder(d=32, layers=(0, 1, 2), seed=2).save_pretrained(tmp_path / "tc")
    calls: list[str] = []
    ct = formats.FORMATS["circuit_tracer"]

    class Counting:
        NAME, DESCRIPTION = ct.NAME, ct.DESCRIPTION

        def detect(self, source):
            calls.append("detect")
            return ct.detect(source)

        def describe(self, source, layers=None, *, variant=None):
            calls.append(f"describe {layers}")
            return ct.describe(source, layers, variant=variant)

        def load(self, source, layers, decoders, *, variant=None):
            calls.append(f"load {layers} {decoders}")
            return ct.load(source, layers, decoders, variant=variant)

    monkeypatch.setitem(formats.FORMATS, "circuit_tracer", Counting())
    tc = load_for_model(folder, tiny_model("llama"), layers=[2, 1])
    assert tc.layers == [1, 2]
    assert calls == ["detect", "describe [1, 2]", "load [1, 2] False"]


def test_attachment_stats_count_encode_calls_rows_and_flushes():
    """clt.stats counts the encode work of real captures: a prefill encoded at once, then decode windows."""
    from tiny_models import tiny_model

    from sparse_clt_hf import attach_clt

    model = tiny_model("llama")
    tc = random_transcoder(layers=(0, 1, 2))
    ids = torch.randint(3, 100, (2, 5))
    with attach_clt(model, tc, top_k=4, window=2) as clt:
        model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)  # 5 + 4 positions per row
        stats = clt.stats
        # the prompt (5 > window) is encoded at once; the 4 decode steps in 2 windows of 2
        assert (stats.encode_calls, stats.rows, stats.flushes) == (3 * 3, 3 * 2 * 9, 2)
        assert stats.seconds > 0
        stats.clear()
        assert (stats.encode_calls, stats.rows, stats.seconds, stats.flushes) == (0, 0, 0.0, 0)
