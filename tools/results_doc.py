"""Write the tables of docs/results.md from the measured results in docs/results/*.json.

    python tools/results_doc.py            # rewrite docs/results.md
    python tools/results_doc.py --check    # exit 1 when docs/results.md differs from what it would write

docs/results.md holds prose and blocks between marker comments::

    <!-- results:NAME -->
    (generated from docs/results/NAME.json)
    <!-- /results:NAME -->

Everything between a pair of markers is replaced by the table of ``NAME.json``; everything outside
them is kept as it is. A marker naming a file that does not exist is an error, and so is a result
file that no marker names (every measured result is shown somewhere).

A result file holds ``command``, ``commit``, ``date``, ``machine`` (``cores``, ``gpu`` and anything
else worth saying about it), ``results`` (``rows``: one object a row, and ``figures``: single
numbers with what they measure), ``columns`` (which keys of a row to show, in order, with their
labels, an optional unit ``suffix``, ``"group": true`` for thousands commas from 1,000 up and
``"align": "right"|"left"``) and optionally ``title``, ``data``, ``index``, ``note`` and
``chose_settings`` (true when the numbers were measured on the 220 public Venice queries that also
chose default settings). Values print as they are stored: a list as ``a / b``, null as ``–``.
The commit is kept in the JSON only: the page says when and where, not which commit.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "docs" / "results"
DOC = ROOT / "docs" / "results.md"

REQUIRED = ("command", "commit", "date", "machine", "results")
BLOCK = re.compile(r"<!-- results:(?P<name>[\w.-]+) -->\n.*?<!-- /results:(?P=name) -->", re.S)
CHOSE_SETTINGS = ("Measured on the 220 public Venice queries that also chose default settings "
                  "(see the top of this page): read it as optimistic.")


class ResultsError(ValueError):
    """A result file or the page's markers are wrong."""


def load_results(results_dir: Path = RESULTS_DIR) -> dict[str, dict]:
    """Every ``NAME.json`` of the folder, by NAME, checked for the keys a result must have."""
    out = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ResultsError(f"{path}: not valid JSON ({e})") from None
        missing = [k for k in REQUIRED if k not in data]
        machine = data.get("machine")
        if not isinstance(machine, dict) or "cores" not in machine or "gpu" not in machine:
            missing.append("machine.cores/machine.gpu")
        if missing:
            raise ResultsError(f"{path}: missing {', '.join(missing)}")
        out[path.stem] = data
    return out


def _number(v, group: bool = False) -> str:
    """A number as stored; integers from 10,000 up (from 1,000 up with ``group``) get thousands commas."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= (1_000 if group else 10_000) else str(v)
    return str(v)


def _value(v, suffix: str = "", group: bool = False) -> str:
    """One cell: numbers as stored plus the unit, a list as ``a / b``, null as a dash."""
    if v is None:
        return "–"
    if isinstance(v, list):
        return " / ".join(_number(x, group) for x in v) + suffix
    if isinstance(v, str):
        return v
    return _number(v, group) + suffix


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _is_numeric(v) -> bool:
    if isinstance(v, list):
        return all(_is_numeric(x) for x in v)
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _table(header: list[str], rows: list[list[str]], right: list[bool]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "| " + " | ".join("---:" if r else "---" for r in right) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _machine(m: dict) -> str:
    parts = [f"{m['cores']} CPU cores", "a GPU" if m["gpu"] else "no GPU"]
    if m.get("memory_gib"):
        parts.append(f"{m['memory_gib']} GiB")
    for key in ("load", "note"):
        if m.get(key):
            parts.append(str(m[key]))
    return ", ".join(parts)


def render_block(name: str, data: dict) -> str:
    """The markdown of one result: its table, its single figures, and how it was measured."""
    res = data["results"]
    rows = res.get("rows", []) if isinstance(res, dict) else []
    figures = res.get("figures", []) if isinstance(res, dict) else []
    lines: list[str] = []
    if data.get("title"):
        lines += [f"**{data['title']}**", ""]
    if rows:
        cols = data.get("columns") or [{"key": k, "label": k} for k in rows[0] if not k.startswith("_")]
        cells = []
        for row in rows:
            texts = [_value(row.get(c["key"]), c.get("suffix", ""), c.get("group", False)) for c in cols]
            if row.get("_bold"):
                texts = [f"**{t}**" if t not in ("", "–") else t for t in texts]
            cells.append(texts)
        right = [c["align"] == "right" if "align" in c else
                 i > 0 and all(_is_numeric(r.get(c["key"])) or r.get(c["key"]) is None for r in rows)
                 for i, c in enumerate(cols)]
        lines += _table([c.get("label", c["key"]) for c in cols], cells, right)
        lines.append("")
    if figures:
        fig_rows = []
        for f in figures:
            text = _value(f.get("value"), f.get("suffix", ""), f.get("group", False))
            fig_rows.append([f["what"], ("about " if f.get("approx") else "") + text])
        lines += _table(["figure", "value"], fig_rows, [False, True])
        lines.append("")
    commands = data["command"] if isinstance(data["command"], list) else [data["command"]]
    how = "Command: " + "; ".join(f"`{c}`" for c in commands) + "."
    how += f" Measured {data['date']} on {_machine(data['machine'])}."
    if data.get("data"):
        how += f" Data: {data['data']}."
    if data.get("index"):
        how += f" Index: {data['index']}."
    lines.append(how)
    if data.get("note"):
        lines += ["", data["note"]]
    if data.get("chose_settings"):
        lines += ["", CHOSE_SETTINGS]
    body = "\n".join(lines).rstrip("\n")
    return f"<!-- results:{name} -->\n{body}\n<!-- /results:{name} -->"


def render_doc(text: str, results: dict[str, dict]) -> str:
    """``text`` with every marked block rewritten from ``results``; prose outside the markers kept."""
    used = set()

    def repl(m: re.Match) -> str:
        name = m.group("name")
        if name not in results:
            raise ResultsError(f"docs/results.md names results:{name}, but there is no docs/results/{name}.json")
        used.add(name)
        return render_block(name, results[name])

    out = BLOCK.sub(repl, text)
    unused = sorted(set(results) - used)
    if unused:
        raise ResultsError("no block in docs/results.md for " + ", ".join(f"docs/results/{n}.json" for n in unused)
                           + " (add <!-- results:NAME --> <!-- /results:NAME -->)")
    return out


def expected_doc(doc: Path = DOC, results_dir: Path = RESULTS_DIR) -> str:
    """What ``doc`` should hold: its own prose with the blocks written from ``results_dir``."""
    return render_doc(Path(doc).read_text(encoding="utf-8"), load_results(results_dir))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="Exit 1 when the page differs from what would be written.")
    ap.add_argument("--doc", type=Path, default=DOC)
    ap.add_argument("--results", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    try:
        want = expected_doc(args.doc, args.results)
    except (ResultsError, OSError) as e:
        print(f"results_doc: error: {e}", file=sys.stderr)
        return 2
    have = args.doc.read_text(encoding="utf-8")
    if args.check:
        if have != want:
            print(f"{args.doc} is out of date: run python tools/results_doc.py", file=sys.stderr)
            return 1
        return 0
    if have != want:
        args.doc.write_text(want, encoding="utf-8")
        print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
