"""The registry of known releases (configs/) ships inside the wheel as sparse_clt_hf/configs."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def test_wheel_maps_configs_into_the_package():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "sparse_clt_hf.configs" in setuptools["packages"]
    assert setuptools["package-dir"]["sparse_clt_hf.configs"] == "configs"
    globs = setuptools["package-data"]["sparse_clt_hf.configs"]
    yamls = sorted(p.name for p in (ROOT / "configs").iterdir() if p.suffix in (".yaml", ".yml"))
    assert yamls and all(any(fnmatch.fnmatch(name, g) for g in globs) for name in yamls)
    # The package list is explicit: every sub-package with an __init__.py must be on it.
    found = {
        p.parent.relative_to(ROOT).as_posix().replace("/", ".") for p in (ROOT / "sparse_clt_hf").rglob("__init__.py")
    }
    assert found <= set(setuptools["packages"]), found - set(setuptools["packages"])
