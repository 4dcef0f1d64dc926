"""Compiled baselines in a process of their own: ``python -m benchmarks.isolated REQUEST RESULT``.

A ``torch.compile`` baseline must be measured where nothing has been patched.  ``apply_kernels``
and Liger change transformers for every later model of their process, not only the model they are
given: names of the modeling modules (``apply_rotary_pos_emb``, norm and MLP classes, a
``*ForCausalLM.forward``), attention implementations registered with transformers.  Such a change
may be inert for an unpatched model run eagerly and still break a compiled one (Dynamo cannot
trace a dispatcher that reads a ContextVar: a graph break at every layer), and undoing it exactly
from the outside cannot be guaranteed.  So :func:`benchmarks.bench_model.run` measures each
compiled provider (``bench_model.COMPILED``: ``torch.compile``, ``hf+compile``) through
:func:`benchmarks.bench_model.run_isolated`: a fresh Python process running this module, which
builds the model from the same seed, runs the same :func:`benchmarks.bench_model.run_provider`
(:func:`measure`) and hands its records back as JSON.  That process also refuses to measure
(:class:`Patched`) if it finds anything patched (:func:`patches_present`) before it starts, and
counts Dynamo's graph breaks over the provider's figures (``extra["graph_breaks"]``;
``extra["graphs"]``: the graphs Dynamo captured).

This module is the child's side: it imports :mod:`benchmarks.bench_model`, never the other way.

The op benchmark's ``torch.compile`` providers stay in the main process: they compile
``llama_kernels.reference`` functions, which nothing patches (``apply_kernels`` gives a patched
model's modules subclasses of their own and changes no module's names), and they run first.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

KERNEL_LIBRARIES = ("llama_kernels", "liger_kernel")  # whose functions must not be found in transformers


class Patched(RuntimeError):
    """A compiled baseline asked to run in a process where transformers has been patched."""


# ---------------------------------------------------------------------------------------------
# Is this process clean?
# ---------------------------------------------------------------------------------------------
def _foreign(value) -> str | None:
    """The module of ``value`` if it is a kernel library's (a function or class of one), else None."""
    owner = getattr(value, "__module__", None) if callable(value) else None
    return owner if isinstance(owner, str) and owner.split(".")[0] in KERNEL_LIBRARIES else None


def patches_present() -> list[str]:
    """Everything of a kernel library (:data:`KERNEL_LIBRARIES`) found in transformers' loaded modules:
    module-level names, attributes of the classes they define (``forward``), and entries of those
    classes' registries (``AttentionInterface._global_mapping``); one line each, empty when clean.

    Reads ``sys.modules`` only (a module not imported yet cannot have been patched); a few
    milliseconds.
    """
    found = []
    for mod_name, module in sorted(sys.modules.items()):
        if not mod_name.startswith("transformers.") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            owner = _foreign(value)
            if owner is not None:
                found.append(f"{mod_name}.{attr} is {owner}.{getattr(value, '__qualname__', attr)}")
                continue
            if not (isinstance(value, type) and value.__module__ == mod_name):
                continue
            for name, member in list(vars(value).items()):
                owner = _foreign(getattr(member, "__func__", member))  # staticmethod / classmethod too
                if owner is not None:
                    found.append(f"{mod_name}.{attr}.{name} is {owner}'s")
                elif type(member) is dict:  # a registry, e.g. AttentionInterface._global_mapping (never a lazy one)
                    found += [f"{mod_name}.{attr}.{name}[{key!r}] is {owner}'s"
                              for key, entry in list(member.items()) if (owner := _foreign(entry)) is not None]
    return found


def refuse_if_patched(what: str) -> None:
    """Raise :class:`Patched`, naming what was changed, if :func:`patches_present` finds anything."""
    found = patches_present()
    if found:
        shown = "; ".join(found[:5]) + (f"; and {len(found) - 5} more" if len(found) > 5 else "")
        raise Patched(f"{what} refused: this process has patched transformers ({shown}); a compiled baseline "
                      "must run in a fresh process (benchmarks.bench_model.run_isolated)")


# ---------------------------------------------------------------------------------------------
# The child's side
# ---------------------------------------------------------------------------------------------
def measure(request: dict) -> dict:
    """What the child does with a request: ``{"records": [...], "ref_losses": [...]}``.

    Raises :class:`Patched` first if this process has patched transformers.
    """
    import torch
    from torch._dynamo.utils import counters

    from . import bench_model, common

    name = request["name"]
    refuse_if_patched(f"{name} (a compiled baseline)")
    common._START = time.perf_counter() - (time.time() - request["started_at"])
    torch.set_num_threads(request["num_threads"])
    bench_model.COMPILE_BACKEND = request["compile_backend"]
    settings, cfg, family = common.settings_from_json(request["settings"]), request["cfg"], request["family"]
    records, ref_losses = [], bench_model.losses_from_json(request["ref_losses"])
    build = bench_model.providers(cfg, settings, family)[name]
    counters.clear()
    bench_model.run_provider(name, build, cfg, settings, request["limits"], records, ref_losses, family)
    breaks = sum(counters["graph_break"].values())
    reasons = [reason.strip().splitlines()[0][:200] for reason in counters["graph_break"]][:3]
    for r in records:
        r.extra.update(graph_breaks=breaks, graphs=counters["stats"]["unique_graphs"])
        if breaks:
            r.extra["graph_break_reasons"] = reasons
            r.note = "; ".join(filter(None, (r.note, f"{breaks} graph breaks over this provider's figures")))
    return {"records": [dataclasses.asdict(r) for r in records], "ref_losses": bench_model.losses_json(ref_losses)}


def main(argv=None) -> int:
    """``python -m benchmarks.isolated REQUEST RESULT``: measure the request, write the result JSON
    (``{"error": ...}`` if it raised); 0, or 130 on Ctrl-C."""
    request_path, result_path = argv if argv is not None else sys.argv[1:]
    request = json.loads(Path(request_path).read_text())
    if os.environ.get("TRITON_INTERPRET") is None and request["settings"]["device"] == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # as benchmarks.__main__ chooses, before triton loads
    try:
        result = measure(request)
    except KeyboardInterrupt:  # Ctrl-C reaches the main process too, which reports it
        return 130
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
