"""The distribution: wheel contents, cheap import, idempotent registration."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Build from a clean copy: setuptools reuses a source tree's build/ folder, whose leftovers
    # would hide a package missing from pyproject.toml.
    source = tmp_path_factory.mktemp("source") / "repo"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"))  # fmt: skip
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out),
         str(source)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    (path,) = out.glob("vllm_focus-*.whl")
    return path


def test_wheel_holds_every_subpackage_and_no_top_level_kernels(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    packages = {n.rsplit("/", 1)[0] for n in names if n.endswith("__init__.py")}
    # Every package of the source tree, under the names it installs as.
    roots = {"vllm_focus": "vllm_focus", "kernels": "vllm_focus/kernels",
             "model_executor": "vllm_focus/model_executor"}  # fmt: skip
    expected = {
        str(init.parent.relative_to(REPO)).replace(folder, installed, 1)
        for folder, installed in roots.items()
        for init in (REPO / folder).rglob("__init__.py")
    }
    assert len(expected) >= 8
    assert expected <= packages
    top_level = {n.split("/", 1)[0] for n in names if "/" in n and ".dist-info" not in n}
    assert top_level == {"vllm_focus"}
    assert "vllm_focus/kernels/focus_cpu.c" in names  # the CPU kernel compiles from it
    for folder in ("kernels", "model_executor", "tests"):
        assert not any(n.startswith(folder + "/") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[vllm.general_plugins]" in text and "vllm_focus:register" in text


def test_import_is_cheap():
    code = (
        "import sys, vllm_focus\n"
        "heavy = [m for m in ('torch', 'triton', 'vllm', 'transformers') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    )
    assert out.stdout.strip() == ""


def test_register_twice_is_harmless():
    code = (
        "import vllm_focus\n"
        "from vllm import ModelRegistry\n"
        "vllm_focus.register(); vllm_focus.register()\n"
        "vllm_focus._registered = False; vllm_focus.register()\n"
        "archs = ModelRegistry.get_supported_archs()\n"
        "print(sorted(a for a in archs if a in ('DreamModel', 'LLaDAModelLM')))\n"
        "import torch; print(torch.cuda.is_initialized())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    )
    assert out.stdout.split("\n")[:2] == ["['DreamModel', 'LLaDAModelLM']", "False"]


def test_focus_backend_is_the_custom_slot_under_its_alias():
    code = (
        "import pickle, vllm_focus\n"
        "from vllm.v1.attention.backends.registry import AttentionBackendEnum as E\n"
        "vllm_focus.register()\n"
        "member = E['FOCUS']\n"
        "print(member is E.CUSTOM, member.get_class().get_name())\n"
        "print(pickle.loads(pickle.dumps(member)) is E.CUSTOM)\n"
        "from vllm.v1.attention.backends.registry import register_backend\n"
        "register_backend(E.CUSTOM, 'other.plugin.Backend')\n"
        "vllm_focus._registered = False\n"
        "try:\n"
        "    vllm_focus.register()\n"
        "except RuntimeError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    )
    lines = out.stdout.splitlines()
    assert lines[:2] == ["True FOCUS", "True"]
    assert "CUSTOM attention backend slot already holds other.plugin.Backend" in lines[2]


def test_plugin_is_discovered_through_its_entry_point():
    from importlib.metadata import entry_points

    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "vllm_focus:register" in names
