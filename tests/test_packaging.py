"""Installs like a JAX library: the wheel holds one top-level package, nemodiff_jax, with convert/ and
pallas_kernels/ inside it as nemodiff_jax.convert and nemodiff_jax.pallas_kernels, plus the embedded assets; the
installed package imports from outside the checkout; `import nemodiff_jax` loads no converter; dependencies are
ranges and requirements.lock satisfies them; the Makefile's Python rule is pyproject's requires-python.

Offline: the wheel is built with --no-build-isolation (setuptools from the test extra) and installed with
--no-deps --target, its dependencies taken from this interpreter's site-packages."""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
MUST_HAVE = ["nemodiff_jax/__init__.py", "nemodiff_jax/cli.py", "nemodiff_jax/decoding/ar.py",
             "nemodiff_jax/convert/hf.py", "nemodiff_jax/convert/safetensors_io.py",
             "nemodiff_jax/pallas_kernels/chunk_attention.py", "nemodiff_jax/assets/config.json",
             "nemodiff_jax/assets/model.safetensors", "nemodiff_jax/assets/tokenizer.json",
             "nemodiff_jax/assets/linear_spec_lora/adapter_model.safetensors"]


def _source_copy(dst: Path) -> Path:
    """The checkout's files (tracked + untracked, not ignored) in a scratch folder: building there leaves no
    build/ or *.egg-info in the checkout, and no stale build/lib file can reach the wheel."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
                             check=True, capture_output=True).stdout.decode()
        files = [f for f in out.split("\0") if f and (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist, say)
        shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", "data", "out", ".whl"))
        return dst
    for f in files:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)
    return dst


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = _source_copy(tmp_path_factory.mktemp("src"))
    dist = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                        "-w", str(dist), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, f"pip wheel failed (is setuptools, from the test extra, installed?)\n{r.stderr}"
    (whl,) = dist.glob("nemodiff_jax-*.whl")
    return whl


def test_wheel_has_one_top_level_package(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (dist_info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        top_level = z.read(f"{dist_info}/top_level.txt").decode().split()
        meta = z.read(f"{dist_info}/METADATA").decode()
    assert {n.split("/")[0] for n in names} == {"nemodiff_jax", dist_info}
    assert top_level == ["nemodiff_jax"]
    missing = [f for f in MUST_HAVE if f not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert not [n for n in names if "/tests/" in n or "/scripts/" in n or n.endswith(".pyc")]
    runtime = [line.split(":", 1)[1].strip() for line in meta.splitlines()
               if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert runtime and not [r for r in runtime if "==" in r], f"exact pins in the wheel's dependencies: {runtime}"
    assert "Provides-Extra: cuda" in meta and re.search(r"Requires-Dist: jax\[cuda13\].*extra == \"cuda\"", meta)


def test_installed_wheel_imports_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                        str(target), str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()])
    # -S: no site-packages .pth hooks (an editable install of the checkout would otherwise be found); the
    # dependencies come from this interpreter's site-packages, after the installed wheel.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *deps]), "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONSAFEPATH", None)
    code = """
import importlib, json, sys
import nemodiff_jax
converter_loaded = sorted(m for m in sys.modules if m.startswith("nemodiff_jax.convert"))
import nemodiff_jax.cli, nemodiff_jax.embedded, nemodiff_jax.convert.hf, nemodiff_jax.pallas_kernels.chunk_attention
missing = {}
for name in ("convert", "pallas_kernels"):
    try:
        importlib.import_module(name)
        missing[name] = False
    except ModuleNotFoundError:
        missing[name] = True
print(json.dumps(dict(
    files=[sys.modules[m].__file__ for m in
           ("nemodiff_jax", "nemodiff_jax.convert.hf", "nemodiff_jax.pallas_kernels.chunk_attention")],
    assets=str(nemodiff_jax.embedded.ASSETS), converter_loaded=converter_loaded, missing=missing)))
"""
    run = tmp_path / "cwd"  # outside the checkout: its folders cannot shadow the installed package
    run.mkdir()
    r = subprocess.run([sys.executable, "-S", "-c", code], cwd=run, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for f in got["files"]:
        assert Path(f).resolve().is_relative_to(target.resolve()), f"{f} is not from the installed wheel"
    assert (Path(got["assets"]) / "model.safetensors").is_file()
    assert Path(got["assets"]).resolve().is_relative_to(target.resolve())
    assert got["converter_loaded"] == [], "import nemodiff_jax loads the converter"
    assert got["missing"] == {"convert": True, "pallas_kernels": True}, "generic top-level modules are importable"

    script = target / "bin" / "nemodiff"  # the console script of [project.scripts]
    r = subprocess.run([sys.executable, "-S", str(script), "--help"], cwd=run, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0 and "generate" in r.stdout, r.stderr


def test_import_loads_no_converter():
    code = "import sys, nemodiff_jax; print([m for m in sys.modules if m.startswith('nemodiff_jax.convert')])"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def _lock(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!]+", line), f"{name}: not name==version: {line}"
            pins[re.sub(r"[-_.]+", "-", line.split("==")[0]).lower()] = line.split("==")[1]
    return pins


def test_locks_satisfy_pyproject():
    cpu, cuda = _lock("requirements.lock"), _lock("requirements-cuda.lock")
    project = PYPROJECT["project"]
    assert "nemodiff-jax" not in cpu and not set(cpu) & set(cuda)
    for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in cpu, f"{req.name} is not in requirements.lock (rerun scripts/lock.sh)"
        assert req.specifier.contains(cpu[name], prereleases=True), f"requirements.lock {req.name}=={cpu[name]} " \
                                                                    f"is outside pyproject's {spec!r}"
    (cuda_req,) = [Requirement(s) for s in project["optional-dependencies"]["cuda"]]
    assert cuda_req.name == "jax" and cuda_req.extras == {"cuda13"} and cuda_req.specifier.contains(cpu["jax"])
    assert cuda["jax-cuda13-plugin"] == cpu["jax"] == cpu["jaxlib"]


def _fake_python(tmp_path: Path, version: tuple[int, int, int]) -> Path:
    """A `python` that reports `version` as sys.version_info and runs `-c CODE` with this interpreter."""
    fake = tmp_path / f"python{version[0]}.{version[1]}"
    patch = (f"import sys, collections; sys.version_info = collections.namedtuple('version_info', "
             f"'major minor micro releaselevel serial')(*{version}, 'final', 0); exec(sys.argv[1])")
    fake.write_text(f'#!/bin/sh\n[ "$1" = -c ] || exit 99\nexec "{sys.executable}" -c "{patch}" "$2"\n')
    fake.chmod(0o755)
    return fake


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_makefile_python_rule_is_requires_python(tmp_path):
    (major, minor) = map(int, re.fullmatch(r">=(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"]).groups())

    def check(version):
        return subprocess.run(["make", "-s", "-C", str(ROOT), "python-check", f"PYTHON={_fake_python(tmp_path, version)}",
                               f"VENV={tmp_path / 'venv'}"], capture_output=True, text=True)

    old = check((major, minor - 1, 9))
    assert old.returncode != 0
    assert f"Python >= {major}.{minor} is required" in old.stderr and f"{major}.{minor - 1}.9" in old.stderr
    for ok in ((major, minor, 0), (major, minor + 1, 2), (major + 1, 0, 0)):
        r = check(ok)
        assert r.returncode == 0, (ok, r.stderr)
    assert not (tmp_path / "venv").exists()


def _package_modules() -> dict[str, Path]:
    """Every module of the package by dotted name (convert/ and pallas_kernels/ under their package names)."""
    roots = {"nemodiff_jax": ROOT / "nemodiff_jax", "nemodiff_jax.convert": ROOT / "convert",
             "nemodiff_jax.pallas_kernels": ROOT / "pallas_kernels"}
    mods = {}
    for prefix, folder in roots.items():
        for f in folder.rglob("*.py"):
            parts = f.relative_to(folder).with_suffix("").parts
            name = ".".join((prefix, *parts)).removesuffix(".__init__")
            mods[name] = f
    return mods


def test_imports_run_one_way():
    """No import cycle inside the package, counting the imports inside functions too (a lazy import is
    still a dependency). Package __init__ re-exports are left out: they only gather the public API."""
    import ast
    import graphlib

    mods = _package_modules()
    graph = {}
    for name, path in mods.items():
        if path.name == "__init__.py":
            continue
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in mods and t != name and mods[t].name != "__init__.py"}
        graph[name] = deps
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None
    assert "nemodiff_jax.slots" in order and order.index("nemodiff_jax.slots") < order.index("nemodiff_jax.engine")
