"""``python -m qkformer.analysis``: the analysis tools, one line each.

``python -m qkformer.analysis <tool> [options]`` runs a tool, the same as
``python -m qkformer.analysis.<tool> [options]``.
"""
from __future__ import annotations

import ast
import importlib
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

# In the order of a typical session: what fires, what it costs, how attention scales and looks,
# how T matters, how training went.
TOOLS = ("firing", "energy", "attention_cost", "attention_maps", "timesteps", "curves")


def summaries() -> Dict[str, str]:
    """Each tool's one-line summary: the first line of its module docstring, read from the source
    (importing the tools would load torch just to print a list)."""
    here = Path(__file__).resolve().parent
    lines = {}
    for tool in TOOLS:
        doc = ast.get_docstring(ast.parse((here / f"{tool}.py").read_text(encoding="utf-8")))
        # plain text for a terminal: :class:`~a.b.C` -> C, ``x`` -> x
        line = re.sub(r":\w+:`~?(?:[\w.]+\.)?([^`]+)`", r"\1", doc.splitlines()[0])
        lines[tool] = line.replace("``", "")
    return lines


def usage() -> str:
    width = max(map(len, TOOLS))
    lines = ["usage: python -m qkformer.analysis <tool> [options]",
             "       python -m qkformer.analysis.<tool> --help   (the tool's options)", "",
             "tools:"]
    lines += [f"  {tool:<{width}}  {line}" for tool, line in summaries().items()]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    tool, rest = argv[0], argv[1:]
    if tool not in TOOLS:
        print(f"error: unknown analysis tool {tool!r}; the tools are {', '.join(TOOLS)}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"qkformer.analysis.{tool}")
    # as if run as python -m qkformer.analysis.<tool>: argv=None keeps the tools' command-line
    # behaviour (user errors end in one "error: ..." line)
    sys.argv = [f"python -m qkformer.analysis.{tool}", *rest]
    module.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
