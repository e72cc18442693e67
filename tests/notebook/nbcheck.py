"""Reading an executed notebook: every cell's text output, and what the checks look for."""

from __future__ import annotations

import json
import re

import nbformat


def cell_texts(path) -> list[str]:
    """The text each code cell printed (streams, results, errors), in cell order."""
    nb = nbformat.read(str(path), as_version=4)
    texts = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        parts = []
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                # a stream that ends mid-line (a progress bar's last redraw on stderr) ends
                # here: the next output starts on a line of its own
                parts.append(out.text if out.text.endswith("\n") else out.text + "\n")
            elif out.output_type in ("execute_result", "display_data"):
                data = out.get("data", {})
                parts.append(data.get("text/plain", ""))
                if "application/vnd.jupyter.widget-view+json" in data:
                    parts.append("[widget]")
            elif out.output_type == "error":
                parts.append("\n".join(out.get("traceback", [])))
        texts.append("".join(parts))
    return texts


def marker(texts: list[str], name: str) -> str:
    """The rest of the line after ``name`` in whichever cell printed it."""
    for text in texts:
        for line in text.splitlines():
            if line.startswith(name + " "):
                return line[len(name) + 1 :]
    raise AssertionError(f"no {name} line in the notebook's output:\n" + "\n---\n".join(texts))


def worker_lines(text: str) -> list[tuple[str, int, str, str]]:
    """(name, pid, node, text) of each line printed with the driver-log prefix."""
    return [
        (m[1], int(m[2]), m[3], m[4])
        for m in re.finditer(r"^\((\S+) pid=(\d+), node=([^)]+)\) (.*)$", text, re.M)
    ]


def tasks_result(texts: list[str]) -> list:
    return json.loads(marker(texts, "TASKS_OK"))
