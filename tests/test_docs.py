"""The documentation: docs/results.md is what tools/results_doc.py writes from docs/results/*.json,
every relative link resolves, the README stays a front door (at most 12 KB), the user-facing pages
name no issue numbers or commits, and every result file says how and where it was measured."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
RESULTS = DOCS / "results"
README = REPO / "README.md"


def _results_doc():
    spec = importlib.util.spec_from_file_location("results_doc", REPO / "tools" / "results_doc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rd = _results_doc()


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _user_pages() -> list[Path]:
    """README.md and docs/**/*.md except the lab notebook under docs/notes/."""
    return [p for p in _pages() if (DOCS / "notes") not in p.parents]


def _without_code(text: str) -> str:
    """Markdown text with fenced code blocks and inline code removed."""
    text = re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


# ---- (1) docs/results.md is generated ---------------------------------------------------------

def test_results_page_is_what_the_tool_writes():
    have = (DOCS / "results.md").read_text(encoding="utf-8")
    assert have == rd.expected_doc(DOCS / "results.md", RESULTS), \
        "docs/results.md is out of date: run python tools/results_doc.py"
    assert rd.main(["--check"]) == 0


def test_every_result_file_has_a_block_and_its_numbers_appear():
    text = (DOCS / "results.md").read_text(encoding="utf-8")
    for path in sorted(RESULTS.glob("*.json")):
        name = path.stem
        assert f"<!-- results:{name} -->" in text and f"<!-- /results:{name} -->" in text, name
        data = json.loads(path.read_text(encoding="utf-8"))
        block = text.split(f"<!-- results:{name} -->", 1)[1].split(f"<!-- /results:{name} -->", 1)[0]
        commands = data["command"] if isinstance(data["command"], list) else [data["command"]]
        assert data["date"] in block and all(c in block for c in commands), name
        assert data["commit"] not in text  # the commit stays in the JSON
        if data.get("chose_settings"):
            assert rd.CHOSE_SETTINGS in block, name


def test_a_changed_number_changes_the_page(tmp_path):
    """Drift either way is caught: a number edited in a JSON, or in the page's table."""
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    doc = tmp_path / "results.md"
    shutil.copy(DOCS / "results.md", doc)
    assert rd.main(["--check", "--doc", str(doc), "--results", str(results)]) == 0

    path = results / "venice_report.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    row = data["results"]["rows"][0]
    row["within_100m"] = 12.3
    path.write_text(json.dumps(data), encoding="utf-8")
    new = rd.expected_doc(doc, results)
    assert new != doc.read_text(encoding="utf-8") and "12.3 %" in new
    assert rd.main(["--check", "--doc", str(doc), "--results", str(results)]) == 1
    assert rd.main(["--doc", str(doc), "--results", str(results)]) == 0  # rewrite
    assert rd.main(["--check", "--doc", str(doc), "--results", str(results)]) == 0
    assert "12.3 %" in doc.read_text(encoding="utf-8")

    # the prose outside the markers is kept; a number edited inside a block is put back
    original = (DOCS / "results.md").read_text(encoding="utf-8")
    edited = original.replace("| 34.1 % |", "| 99.9 % |", 1)
    assert edited != original
    doc.write_text(edited + "\nA closing remark.\n", encoding="utf-8")
    out = rd.expected_doc(doc, RESULTS)
    assert "99.9 %" not in out and out.endswith("\nA closing remark.\n")


def test_markers_and_files_must_match(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    with pytest.raises(rd.ResultsError, match="no docs/results/nothing.json"):
        rd.render_doc("<!-- results:nothing -->\n<!-- /results:nothing -->\n", rd.load_results(results))
    with pytest.raises(rd.ResultsError, match="no block"):
        rd.render_doc("prose only\n", rd.load_results(results))
    (results / "broken.json").write_text(json.dumps({"command": "x", "results": {}}), encoding="utf-8")
    with pytest.raises(rd.ResultsError, match="missing"):
        rd.load_results(results)


# ---- (2) links ---------------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def test_every_relative_link_resolves():
    broken = []
    checked = 0
    for page in _pages():
        for target in LINK.findall(_without_code(page.read_text(encoding="utf-8"))):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue  # http(s), mailto, anchors within the page
            path = target.split("#", 1)[0]
            checked += 1
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert checked > 20
    assert not broken, broken


# ---- (3) the README is a front door -----------------------------------------------------------

def test_readme_is_at_most_12_kb():
    assert README.stat().st_size <= 12 * 1024, README.stat().st_size


def test_readme_keeps_the_install_and_test_commands():
    text = README.read_text(encoding="utf-8")
    assert 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]"' in text
    assert "\npython -m pytest -q\n" in text
    assert "docs/results.md" in text


# ---- (4) no issue numbers or commits on the user-facing pages ---------------------------------

ISSUE = re.compile(r"\bissues?\s+#?\d+|(?<![\w&/#])#\d+\b", re.I)
COMMIT = re.compile(r"(?<![\w./-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}(?![\w-])")


def test_the_patterns_catch_what_they_should():
    assert ISSUE.search("since issue 10's second round") and ISSUE.search("fixed in #12.")
    assert not ISSUE.search("## Results") and not ISSUE.search("see [scale](scale.md#threads-and-environment-variables)")
    assert COMMIT.search("on commit 10c6c77's code") and COMMIT.search("b4187121fb80a55e3cb16a11ff8d97fb80573acb")
    assert not COMMIT.search("1,000,000 images, 5000000 distractors, a decade")


@pytest.mark.parametrize("page", _user_pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_user_pages_name_no_issue_or_commit(page):
    text = page.read_text(encoding="utf-8")
    assert not ISSUE.findall(text), ISSUE.findall(text)
    assert not COMMIT.findall(text), COMMIT.findall(text)


# ---- (5) every result says how and where it was measured --------------------------------------

@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_result_files_say_how_and_where(path):
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in ("command", "commit", "date", "machine", "results"):
        assert data.get(key) not in (None, ""), key
    assert re.fullmatch(r"[0-9a-f]{7,40}", data["commit"])
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", data["date"])
    assert isinstance(data["machine"]["cores"], int) and isinstance(data["machine"]["gpu"], bool)
    assert isinstance(data.get("chose_settings", False), bool)


def test_there_are_results():
    assert len(list(RESULTS.glob("*.json"))) >= 10


# ---- (6) the commands the docs describe are the CLI's -----------------------------------------

def _cli_commands():
    import typer

    from delg_geo.apps.cli import app

    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(sub, path + [name])
        else:
            yield " ".join(path), [o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]

    return list(walk(typer.main.get_command(app), []))


def test_usage_names_every_command_and_option_and_the_readme_every_command():
    usage = (DOCS / "usage.md").read_text(encoding="utf-8")
    readme = README.read_text(encoding="utf-8")
    commands = _cli_commands()
    assert len(commands) >= 15
    for name, options in commands:
        assert f"delg-geo {name}" in usage, name
        last = name.split()[-1]
        assert f"delg-geo {name}" in readme or re.search(rf"`{re.escape(name.split()[0])} {re.escape(last)}\b", readme), name
        missing = [o for o in options if o != "--help" and not re.search(rf"{re.escape(o)}(?![\w-])", usage)]
        assert not missing, (name, missing)


def test_the_readme_headline_numbers_come_from_the_results():
    """Every number in the README's results section is a value some committed result file holds
    (thousands commas ignored): a headline typed by hand, or left behind by a new run, fails."""
    section = README.read_text(encoding="utf-8").split("## Results", 1)[1].split("\n## ", 1)[0]
    held = set()
    for path in RESULTS.glob("*.json"):
        held |= set(re.findall(r"-?\d+(?:\.\d+)?", path.read_text(encoding="utf-8").replace(",", "")))
    quoted = re.findall(r"\d[\d,]*(?:\.\d+)?", section)
    missing = sorted({q for q in quoted if q.replace(",", "") not in held})
    assert quoted and not missing, missing
