"""tools/importcycles.py finds import cycles statically (TYPE_CHECKING and late imports count)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import importcycles  # noqa: E402


def write(root, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_cycles_through_type_checking_and_function_imports(tmp_path):
    write(
        tmp_path,
        {
            "pkg/__init__.py": "from .a import A\n",
            "pkg/a.py": """
                from typing import TYPE_CHECKING
                if TYPE_CHECKING:
                    from .b import B
                A = 1
            """,
            "pkg/b.py": "from . import a\nB = 2\n",
            "pkg/sub/__init__.py": "from .c import C\n",
            "pkg/sub/c.py": """
                def late():
                    from pkg.sub import d
                C = 3
            """,
            "pkg/sub/d.py": "from .c import C\nimport os\n",
            "pkg/e.py": "from .sub import C\n",
        },
    )
    cycles, lines = importcycles.find_cycles(str(tmp_path), "pkg")
    assert cycles == [["pkg.a", "pkg.b"], ["pkg.sub.c", "pkg.sub.d"]]
    assert [e.type_only for e in lines[("pkg.a", "pkg.b")]] == [True]
    # a package __init__ re-exporting its submodules is not a cycle; TYPE_CHECKING can be ignored
    runtime, _ = importcycles.find_cycles(str(tmp_path), "pkg", runtime_only=True)
    assert runtime == [["pkg.sub.c", "pkg.sub.d"]]
    assert importcycles.find_cycles(str(tmp_path), "pkg", exclude=("pkg.sub",))[0] == [
        ["pkg.a", "pkg.b"]
    ]


def test_command_line_exit_status(tmp_path):
    write(tmp_path, {"ok/__init__.py": "", "ok/x.py": "from . import y\n", "ok/y.py": "\n"})
    tool = os.path.join(ROOT, "tools", "importcycles.py")
    done = subprocess.run(
        [sys.executable, tool, "ok", "--root", str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 0 and "no import cycles" in done.stdout
    write(tmp_path, {"ok/y.py": "from .x import *\n"})
    done = subprocess.run(
        [sys.executable, tool, "ok", "--root", str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 1 and "ok.x, ok.y" in done.stdout
