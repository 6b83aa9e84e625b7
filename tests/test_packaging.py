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


def test_the_inference_engine_is_an_extra_and_the_robot_pins_fit_jetpack6():
    """onnxruntime's build is the machine's (PyPI's CPU one, onnxruntime-gpu, NVIDIA's Jetson wheel): a fixed
    dependency would install the CPU build over a GPU one. numpy is a range down to the last release with Python
    3.10 wheels (JetPack 6); `make test-robot-floor` runs the robot side's tests there."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = project["dependencies"]
    extras = project["optional-dependencies"]
    assert not [d for d in core if d.startswith("onnxruntime")]
    assert extras["cpu"] == ["onnxruntime>=1.23.2,<1.33"]
    # Not in export either: on a GPU host it would install the CPU build over onnxruntime-gpu. The quantizer says
    # itself when the build it finds lacks what it uses (tests/export/test_quantize.py).
    assert not [d for extra in extras.values() for d in extra if d.startswith("onnxruntime") and extra != extras["cpu"]]
    assert "numpy>=2.2.6,<2.5" in core
    makefile = (ROOT / "Makefile").read_text()
    assert "EXTRAS := cpu," in makefile and "FLOOR_PINS := numpy==2.2.6 onnxruntime==1.23.2" in makefile
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split() if "==" in line)
    assert pins["numpy"] == "2.4.6" and pins["onnxruntime"] == "1.32.0"     # the ranges' other ends


def test_without_onnxruntime_the_runtime_says_which_build_to_install():
    code = (
        "import sys\n"
        "sys.modules['onnxruntime'] = None\n"          # as if not installed
        "from edgeact.runtime.errors import ConfigError\n"
        "from edgeact.runtime.ort_engine import import_onnxruntime\n"
        "try:\n"
        "    import_onnxruntime()\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "onnxruntime is not installed" in out and "pip install 'edgeact[cpu]'" in out and "Jetson" in out


def test_the_robot_side_imports_onnxruntime_only_through_the_one_helper():
    import ast

    direct = []
    for top in ("runtime", "drivers", "calibration"):
        for path in (ROOT / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                if any(n.split(".")[0] == "onnxruntime" for n in names):
                    direct.append(str(path.relative_to(ROOT)))
    assert direct == ["runtime/ort_engine.py"], direct          # import_onnxruntime's own import, once


def test_build_engines_without_the_onnx_package_says_to_install_it(tmp_path):
    """A robot installed with the runtime only (README "Installing on the robot") builds its engines there."""
    code = (
        "import sys\n"
        "sys.modules['onnx'] = None\n"
        "from pathlib import Path\n"
        "from edgeact.runtime.errors import ConfigError\n"
        "from edgeact.export.engines import require_standard_ops\n"
        "try:\n"
        "    require_standard_ops('decoder', Path('decoder.onnx'), 'orin')\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "build-engines reads the stages' graphs with the onnx package" in out and "pip install onnx" in out


def test_every_robot_side_extra_names_one_pin_per_package_for_each_jetpack_python():
    """A robot installs its extras on JetPack's Python (6: 3.10, 7: 3.12): each extra must select exactly one pinned
    version of each package there and on the host's 3.11 (a second pin behind a marker where the host's has no
    wheel for that Python)."""
    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    robot = ("serial", "can", "realsense", "kinematics", "calibration", "plot", "tensorrt")
    for name in robot:
        for python in ("3.10", "3.11", "3.12"):
            chosen = [r for r in map(Requirement, extras[name])
                      if r.marker is None or r.marker.evaluate({"python_version": python, "extra": name})]
            packages = [r.name for r in chosen]
            assert sorted(packages) == sorted(set(packages)), (name, python, packages)
            assert all(str(r.specifier).startswith("==") for r in chosen), (name, python, chosen)
    assert [str(r.specifier) for r in map(Requirement, extras["calibration"])
            if r.name == "scipy" and r.marker.evaluate({"python_version": "3.10", "extra": ""})] == ["==1.15.3"]


def test_every_commands_help_renders_as_written():
    """argparse %-formats an option's help but a description only when it holds %(prog): a description's '%%'
    printed as '%%' (hand-eye-marker's "printed at 100 %%")."""
    import argparse

    from edgeact.runtime.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert len(commands) > 20
    for name, command in commands.items():
        text = command.format_help()
        assert "%%" not in text and "%(" not in text, (name, text)
