"""Execute a notebook with nbclient and an ipykernel of this interpreter; write the result.

    python tests/notebook/run_notebook.py IN.ipynb OUT.ipynb [--timeout S] [--cwd DIR]

Run inside a netlab namespace (``ip netns exec``) the client and its kernel share that
namespace's loopback, so the kernel's node lives on that host. Exits 1 (after writing OUT) when
a cell fails; OUT then holds the error output of the failing cell.
"""

from __future__ import annotations

import argparse
import sys

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per cell")
    parser.add_argument("--cwd", default=".", help="the kernel's working directory")
    args = parser.parse_args(argv)
    nb = nbformat.read(args.source, as_version=4)
    client = NotebookClient(
        nb,
        timeout=int(args.timeout),
        kernel_name="python3",
        resources={"metadata": {"path": args.cwd}},
        startup_timeout=120,
    )
    code = 0
    try:
        client.execute()
    except CellExecutionError as exc:
        print(str(exc)[-4000:], file=sys.stderr)
        code = 1
    finally:
        nbformat.write(nb, args.target)
    return code


if __name__ == "__main__":
    sys.exit(main())
