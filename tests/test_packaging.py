"""The distribution maps every package folder, and the robot-side runtime stays free of torch."""
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = set()
    for top, pkg in ((f, f"edgeact.{f}") for f in ("export", "runtime", "drivers", "calibration")):
        assert cfg["package-dir"][pkg] == top
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            found.add(".".join([pkg, *rel.parts]))
    assert found == listed, f"add to / remove from pyproject packages: {sorted(found ^ listed)}"


def test_runtime_import_does_not_load_torch():
    code = (
        "import importlib, pkgutil, sys\n"
        "import edgeact.runtime as rt\n"
        "for m in pkgutil.walk_packages(rt.__path__, 'edgeact.runtime.'):\n"
        "    importlib.import_module(m.name)\n"
        "import edgeact.runtime.cli as cli; cli.build_parser()\n"
        "print(sorted(n for n in ('torch', 'transformers') if n in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
