"""Regenerate the key table of docs/config.md from ``qmlhfl_mpi.config.schema()``.

    python docs/gen_config_doc.py          # rewrite the table in docs/config.md
    python docs/gen_config_doc.py --check  # exit 1 if the table is out of date

Only the text between ``<!-- schema:begin -->`` and ``<!-- schema:end -->`` is
generated; the prose around it is written by hand.  Types, defaults and valid
ranges come from the dataclass fields and their metadata (``lo``, ``hi``,
``lo_open``, ``choices``, ``doc``), i.e. from the same rules the loader
enforces.  tests/test_docs.py checks that the table is current.
"""
from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

BEGIN = "<!-- schema:begin -->"
END = "<!-- schema:end -->"
DOC = Path(__file__).resolve().with_name("config.md")

# Meaning of keys whose field has no ``doc`` metadata yet (the field's own doc wins).
FALLBACK_DOC = {
    "data.name": "data set: embedded synthetic, or an image data set read from data.root",
    "data.partition.kind": "how image data are split over devices (ignored for synthetic data)",
    "data.partition.classes_per_device": "shards: classes per device",
    "model.name": "a built-in model (tables above) or a plug-in reference",
}
# Cross-field rules from config.validate() that the field metadata cannot express.
RULES = {
    "topology.branching": "exactly one of branching / tree",
    "topology.tree": "exactly one of branching / tree",
    "tau": "required: N values",
    "quantizer.levels": "required: N values",
    "latency.uplink_rate": "N values or empty",
    "latency.uplink_latency": "N values or empty",
    "quantizer.kind": "N values or empty",
    "quantizer.topk_fraction": "N values or empty",
    "quantizer.error_feedback": "N values or empty; not on a float32 link",
    "quantizer.downlink": "N values or empty",
    "participation.fraction": "N values or empty",
    "participation.availability": "N values or empty",
    "server.optimizer": "N values or empty",
    "server.lr": "N values or empty",
    "server.momentum": "N values or empty",
    "server.eps": "N values or empty",
    "server.betas": "[b1, b2] or N such pairs, 0 <= b < 1",
    "quantizer.bucket": "integer >= 0, or `tensor`",
    "train.nesterov": "needs train.momentum > 0",
    "train.lr_min": "<= train.lr (cosine)",
}
_SCALAR = {int: "int", float: "float", bool: "bool", str: "str"}
# Keys typed ``Any`` in the schema (validated by config.validate()).
ANY_TYPES = {"topology.tree": "int or nested list", "model.args": "mapping", "data.args": "mapping",
             "callbacks": "list of references or {ref, args}", "quantizer.bucket": "int or 'tensor'",
             "server.betas": "pair or list of pairs"}
REG_BEGIN = "<!-- registries:begin -->"
REG_END = "<!-- registries:end -->"


def _type(tp: Any) -> str:
    if tp is Any:
        return "int or nested list"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        return f"list of {_SCALAR.get(args[0], str(args[0]))}"
    if args and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type(a) for a in inner) + " or null"
    return _SCALAR.get(tp, str(tp))


def _num(x: Any) -> str:
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    if isinstance(x, int) and x == 2**63 - 1:
        return "2^63-1"
    return repr(x)


def _range(f: dataclasses.Field) -> str:
    m = f.metadata
    if m.get("registry") is not None:
        return ", ".join(f"`{n}`" for n in m["registry"].names()) + ", or a plug-in `module:attr` / `file.py:attr`"
    if m.get("choices"):
        return ", ".join(f"`{c}`" for c in m["choices"])
    lo, hi, lo_open = m.get("lo"), m.get("hi"), m.get("lo_open")
    if lo is not None and hi is not None:
        return f"{'>' if lo_open else '>='} {_num(lo)} and <= {_num(hi)}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {_num(lo)}"
    if hi is not None:
        return f"<= {_num(hi)}"
    return ""


def _yaml(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_yaml(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        v = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    return f"`{_yaml(v)}`"


def table() -> str:
    """The generated Markdown table, one row per leaf key of the schema."""
    from qmlhfl_mpi.config import schema

    rows = ["| key | type | default | valid | meaning |", "|---|---|---|---|---|"]
    for key, tp, f in schema():
        valid = "; ".join(x for x in (_range(f), RULES.get(key, "")) if x)
        doc = f.metadata.get("doc") or FALLBACK_DOC.get(key, "")
        cells = [f"`{key}`", ANY_TYPES.get(key, _type(tp)), _default(f), valid, doc]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def registries() -> str:
    """One table per registry: the built-in choices and what they are."""
    from qmlhfl_mpi.core.codecs import CODECS
    from qmlhfl_mpi.core.partition import PARTITIONERS
    from qmlhfl_mpi.core.server_opt import SERVER_OPTIMIZERS
    from qmlhfl_mpi.data.registry import DATASETS
    from qmlhfl_mpi.learning.registry import MODELS

    out = []
    for reg in (MODELS, DATASETS, PARTITIONERS, CODECS, SERVER_OPTIMIZERS):
        out += [f"`{reg.key}` ({reg.kind}s):", "", "| name | what it is |", "|---|---|"]
        out += [f"| `{e.name}` | {e.doc} |" for e in reg.entries()]
        out.append("")
    return "\n".join(out).rstrip()


def _replace(text: str, begin: str, end: str, body: str) -> str:
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"docs/config.md must contain {begin} followed by {end}")
    return text[: i + len(begin)] + "\n" + body + "\n" + text[j:]


def render(text: str) -> str:
    """``text`` (the whole of docs/config.md) with the generated parts replaced."""
    return _replace(_replace(text, BEGIN, END, table()), REG_BEGIN, REG_END, registries())


def main(argv: list[str]) -> int:
    text = DOC.read_text(encoding="utf-8")
    new = render(text)
    if "--check" in argv:
        if new != text:
            print(f"{DOC} is out of date: run python docs/gen_config_doc.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        DOC.write_text(new, encoding="utf-8")
        print(f"updated {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
