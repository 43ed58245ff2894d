"""Safe loading, kept true: no file in the repository unpickles, runs remote or generated code, or loads YAML with a
loader that builds Python objects.

Every weight load is safetensors or ``torch.load(..., weights_only=True)``; diffusers / transformers / open_clip
``from_pretrained`` prefer safetensors and fall back to ``torch.load(weights_only=True)`` themselves (and open_clip
is called with ``weights_only=True``, critics/rewards/clip_score.py). Nothing sets ``trust_remote_code`` or
``custom_pipeline``; YAML goes through ``yaml.safe_load`` or a ``SafeLoader`` subclass (rl/config.py); no
``eval``/``exec``; ``np.load`` never with ``allow_pickle=True``.

The scan reads the Python sources with ``ast`` (import aliases resolved, so ``from torch import load`` is caught
too), the shell scripts with a regex, and every ``_component_`` in the YAML configs (a config names a callable, so
``_component_: torch.load`` would be an unsafe load as well). An exception needs an entry in ALLOWED with a reason.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", "runs", "build", "dist", "__pycache__", ".venv", "venv", "node_modules"}
ALLOWED: dict[tuple[str, str], str] = {}  # (relative path, finding) -> why it is safe; empty on purpose

FORBIDDEN_CALLS = {  # dotted callable -> why
    "pickle.load": "unpickling runs arbitrary code", "pickle.loads": "unpickling runs arbitrary code",
    "pickle.Unpickler": "unpickling runs arbitrary code", "_pickle.load": "unpickling runs arbitrary code",
    "_pickle.loads": "unpickling runs arbitrary code", "cPickle.load": "unpickling runs arbitrary code",
    "dill.load": "unpickling runs arbitrary code", "dill.loads": "unpickling runs arbitrary code",
    "cloudpickle.load": "unpickling runs arbitrary code", "cloudpickle.loads": "unpickling runs arbitrary code",
    "joblib.load": "joblib unpickles", "marshal.load": "marshal loads code objects",
    "marshal.loads": "marshal loads code objects", "shelve.open": "shelve unpickles",
    "pandas.read_pickle": "unpickling runs arbitrary code", "torch.jit.load": "TorchScript is code",
    "torch.hub.load": "torch.hub downloads and runs a repository's hubconf.py",
    "torch.package.PackageImporter": "torch.package unpickles", "yaml.unsafe_load": "builds arbitrary Python objects",
    "yaml.full_load": "builds Python objects", "yaml.unsafe_load_all": "builds arbitrary Python objects",
    "yaml.full_load_all": "builds Python objects", "builtins.eval": "runs a string as code",
    "builtins.exec": "runs a string as code", "eval": "runs a string as code", "exec": "runs a string as code",
}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
YAML_LOADS = {"yaml.load", "yaml.load_all"}
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader", "yaml.CBaseLoader"}
UNSAFE_YAML_LOADERS = {"yaml.Loader", "yaml.UnsafeLoader", "yaml.FullLoader", "yaml.CLoader", "yaml.CUnsafeLoader",
                       "yaml.CFullLoader"}
SHELL_PATTERNS = [re.compile(p) for p in (r"torch\.load\((?![^)]*weights_only\s*=\s*True)", r"pickle\.loads?\(",
                                          r"trust_remote_code\s*=\s*True", r"allow_pickle\s*=\s*True",
                                          r"yaml\.(unsafe_|full_)?load\(", r"torch\.(jit|hub)\.load\(")]


# ------------------------------------------------------------------------------------------------ the scanner
def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted origin for every import (``import numpy as np`` -> np: numpy)."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _is_const(node: ast.AST | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _safe_loader_classes(tree: ast.AST, aliases: dict[str, str]) -> set[str]:
    """Classes of this module that derive from a safe YAML loader (e.g. rl.config._StrictLoader)."""
    safe = set(SAFE_YAML_LOADERS)
    changed = True
    while changed:  # subclasses of subclasses
        changed = False
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name not in safe and \
                    any(_dotted(b, aliases) in safe for b in node.bases):
                safe.add(node.name)
                changed = True
    return safe


def scan_python(source: str) -> list[str]:
    """Findings ("line N: what") of one Python source."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    safe_loaders = _safe_loader_classes(tree, aliases)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _dotted(node, aliases) in UNSAFE_YAML_LOADERS:
            found.append(f"line {node.lineno}: {_dotted(node, aliases)} builds Python objects (use yaml.safe_load)")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        kw = {k.arg: k.value for k in node.keywords if k.arg is not None}
        if name in FORBIDDEN_CALLS:
            found.append(f"line {node.lineno}: {name}(...): {FORBIDDEN_CALLS[name]}")
        if name in TORCH_LOADS and not _is_const(kw.get("weights_only"), True):
            found.append(f"line {node.lineno}: {name}(...) without weights_only=True unpickles arbitrary objects "
                         f"(use safetensors, or weights_only=True)")
        if name in YAML_LOADS:
            loader = kw.get("Loader", node.args[1] if len(node.args) > 1 else None)
            if loader is None or _dotted(loader, aliases) not in safe_loaders:
                found.append(f"line {node.lineno}: {name}(...) without a SafeLoader (use yaml.safe_load)")
        if "allow_pickle" in kw and not _is_const(kw["allow_pickle"], False):
            found.append(f"line {node.lineno}: {name}(..., allow_pickle=...) unpickles object arrays")
        if "trust_remote_code" in kw and not _is_const(kw["trust_remote_code"], False):
            found.append(f"line {node.lineno}: {name}(..., trust_remote_code=...) runs a repository's code")
        if "custom_pipeline" in kw and not _is_const(kw["custom_pipeline"], None):
            found.append(f"line {node.lineno}: {name}(..., custom_pipeline=...) runs a repository's code")
    return found


def scan_shell(text: str) -> list[str]:
    return [f"line {i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1)
            if any(p.search(line) for p in SHELL_PATTERNS)]


def scan_yaml_components(text: str) -> list[str]:
    """``_component_`` values of a config that name a forbidden or unpickling callable."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            target = node.get("_component_")
            if isinstance(target, str) and (target in FORBIDDEN_CALLS or target in TORCH_LOADS or
                                            target in YAML_LOADS or target.split(".")[0] in ("pickle", "dill")):
                found.append(f"_component_: {target}")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(yaml.safe_load(text))
    return found


def repository_files(*suffixes: str) -> list[Path]:
    out = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        out += [Path(folder, f) for f in files if Path(f).suffix in suffixes]
    return sorted(out)


# ------------------------------------------------------------------------------------------------ the tests
def test_no_unsafe_loading_anywhere_in_the_repository():
    scanners = {".py": scan_python, ".sh": scan_shell, ".yaml": scan_yaml_components, ".yml": scan_yaml_components}
    files = repository_files(*scanners)
    assert len([f for f in files if f.suffix == ".py"]) > 50  # the scan really walks the sources
    findings = []
    for path in files:
        rel = str(path.relative_to(ROOT))
        for finding in scanners[path.suffix](path.read_text(encoding="utf-8")):
            if (rel, finding.split(": ", 1)[-1]) not in ALLOWED:
                findings.append(f"{rel} {finding}")
    assert not findings, "unsafe loading:\n" + "\n".join(findings)


@pytest.mark.parametrize("source", [
    "import torch\ntorch.load('x.pt')",
    "import torch\ntorch.load('x.pt', weights_only=False)",
    "from torch import load\nload('x.pt', map_location='cpu')",
    "import torch as T\nT.serialization.load(f)",
    "import pickle\npickle.loads(b)",
    "import pickle as pk\npk.Unpickler(f).load()",
    "from pickle import load\nload(f)",
    "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
    "import yaml\nyaml.load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.FullLoader)",
    "import yaml\nyaml.unsafe_load(text)",
    "from yaml import Loader\nimport yaml\nyaml.load(text, Loader)",
    "from transformers import AutoModel\nAutoModel.from_pretrained(p, trust_remote_code=True)",
    "from transformers import AutoModel\nAutoModel.from_pretrained(p, trust_remote_code=flag)",
    "from diffusers import DiffusionPipeline\nDiffusionPipeline.from_pretrained(p, custom_pipeline='x')",
    "eval('1 + 1')",
    "exec(code)",
    "import torch\ntorch.hub.load('repo', 'model')",
    "import torch\ntorch.jit.load('m.pt')",
])
def test_the_scanner_finds(source):
    assert scan_python(source), source


@pytest.mark.parametrize("source", [
    "import torch\ntorch.load('x.pt', map_location='cpu', weights_only=True)",
    "from safetensors.torch import load_file\nload_file('x.safetensors')",
    "import numpy as np\nnp.load('a.npy')\nnp.load('b.npy', allow_pickle=False)",
    "import yaml\nyaml.safe_load(text)\nyaml.load(text, Loader=yaml.SafeLoader)",
    "import yaml\nclass Strict(yaml.SafeLoader):\n    pass\nclass Stricter(Strict):\n    pass\n"
    "yaml.load(text, Loader=Stricter)",
    "model.eval()\nnet.train().eval()",
    "import pickle\nwith pytest.raises(pickle.UnpicklingError):\n    pass",
    "AutoModel.from_pretrained(p, trust_remote_code=False)",
])
def test_the_scanner_passes(source):
    assert scan_python(source) == [], source


def test_shell_and_config_scans():
    assert scan_shell("python -c 'import torch; torch.load(\"a\")'") and not scan_shell(
        "python -c 'torch.load(\"a\", weights_only=True)'")
    assert scan_yaml_components("model: {_component_: torch.load, f: x.pt}") == ["_component_: torch.load"]
    assert scan_yaml_components("a: [{_component_: pickle.loads}]") and \
        not scan_yaml_components("model: {_component_: shapes.models.load_shapes_policy}")
