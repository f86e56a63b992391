"""The package's shape: no import cycles between its modules (module-level or inside functions), every library
module small enough to read in one sitting, and the README's layout naming every module there is."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dogbreed"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports anywhere in its body (a lazy import is still a dependency)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_between_the_packages_modules():
    graph = import_graph()
    assert len(graph) > 40 and graph["dogbreed.scan.job"]  # the graph is real
    assert cycles(graph) == []


def test_no_library_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_the_readme_layout_names_every_module_and_job():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = text[text.index("## Layout"):]
    layout = layout[:layout.index("\n## ", 4)] if "\n## " in layout[4:] else layout
    named = set(re.findall(r"([a-z_]+)\.py", layout))
    modules = {p.stem for p in _modules().values() if p.stem != "__init__"} | {p.stem for p in (ROOT / "jobs").glob("*.py")}
    assert modules - named == set(), "modules the README's layout does not name"
    assert named - modules == set(), "names in the README's layout that are not modules"


def test_only_one_module_decodes_photo_bytes():
    """Image.open, torchvision's decode_jpeg, cv2.imdecode, imagecodecs and rawpy appear in the decode module and
    its Pillow plugins only: every path gets the same pixels and the same guards."""
    decoders = re.compile(r"Image\.open\(|decode_jpeg\(|imdecode\(|jpegxl_decode\(|rawpy\.imread\(|\.decode_image\(")
    found = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if decoders.search(p.read_text(encoding="utf-8"))}
    assert found == {"dogbreed/vision/decode.py", "dogbreed/vision/codecs.py"}


def test_the_decode_stage_imports_no_network_library():
    """Ray's decode workers import dogbreed.scan.pipeline; torch, timm and OpenVINO (seconds each) stay out of it."""
    import subprocess
    import sys

    code = ("import sys, dogbreed.scan.pipeline, dogbreed.vision.worker; "
            "print(sorted(m for m in ('torch', 'timm', 'openvino') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
