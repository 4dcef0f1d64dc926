"""Generate the API summary in ``llama_kernels/__init__.py``'s docstring from the package itself.

Each public name (``llama_kernels._EXPORTS``: every op of ``ops/registry.py``, then the rest of the
API) gets its signature, as ``inspect`` reads it, and the first sentence of its docstring; the
submodules ``model`` and ``reference`` close the list.  ``python tools/api_docstring.py`` rewrites
the docstring in place; ``--check`` exits with 1 if it is stale (``tests/test_registry.py`` runs it).
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INIT = ROOT / "llama_kernels" / "__init__.py"
BEGIN, END = "Public API (generated", "\nNames load on first use"
WIDTH, INDENT = 100, " " * 4


def _first_sentence(obj) -> str:
    doc = " ".join((inspect.getdoc(obj) or "").split("\n\n")[0].split())
    end = doc.find(". ")
    return doc if end < 0 else doc[: end + 1]


def _signature(obj) -> inspect.Signature:
    """``obj``'s signature without annotations (they are in the functions' docs)."""
    signature = inspect.signature(obj)
    return signature.replace(parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
                             return_annotation=inspect.Signature.empty)


def _entry(name: str, obj) -> list[str]:
    signature = f"{name}{_signature(obj)}"
    lines = textwrap.wrap(signature, WIDTH, initial_indent=INDENT, subsequent_indent=INDENT + " " * 8,
                          break_on_hyphens=False)
    summary = _first_sentence(obj)
    if summary:
        lines += textwrap.wrap(summary, WIDTH, initial_indent=INDENT * 2, subsequent_indent=INDENT * 2)
    return lines


def api_summary() -> str:
    """The generated block: one entry per public name, in ``_EXPORTS`` order."""
    import llama_kernels

    lines = []
    for name in llama_kernels._EXPORTS:
        lines += _entry(name, getattr(llama_kernels, name))
    lines.append(f"{INDENT}model          the eager reference LLaMA (model.Llama, model.LlamaConfig)")
    lines.append(f"{INDENT}reference      the eager twin of every op, named after it")
    return "\n".join(lines)


def docstring_with(summary: str, text: str) -> str:
    """``text`` (the source of ``__init__.py``) with the block after its ``Public API`` line replaced."""
    start = text.index("::\n\n", text.index(BEGIN)) + len("::\n\n")
    end = text.index(END, start)
    return text[:start] + summary + "\n" + text[end:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit with 1 if the docstring is stale")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # importing the ops needs no GPU
    sys.path.insert(0, str(ROOT))
    text = INIT.read_text()
    new = docstring_with(api_summary(), text)
    if args.check:
        if new != text:
            print(f"{INIT} has a stale API docstring: run python tools/api_docstring.py", file=sys.stderr)
            return 1
        return 0
    INIT.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
