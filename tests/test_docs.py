"""The docs describe the tree as it is: paths they name exist, citations resolve, figures come
from the committed results, and the code cites our docs rather than a document outside the repo."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "ARCHITECTURE.md", ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PATH = re.compile(r"(?<![\w./~-])(?:qoq|tests|benchmarks|docs|scripts)/[\w./-]*[\w/]")
CITATION = re.compile(r"\b((?:docs/[\w-]+|ARCHITECTURE)\.md)#([\w-]+)")


def tree_paths(text: str) -> list[str]:
    """The paths of ARCHITECTURE.md's layout block: names at indent 0, 2, 4 nest like folders;
    deeper-indented lines continue a description."""
    block = text.split("```")[1]
    stack: list[tuple[int, str]] = []
    paths = []
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        if not line.strip() or indent > 6:
            continue
        name = line.split()[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "".join(p for _, p in stack) + name
        paths.append(path)
        if name.endswith("/"):
            stack.append((indent, name))
    return paths


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in doc.read_text().splitlines() if line.startswith("#")}


def test_architecture_tree_names_real_paths():
    paths = tree_paths((ROOT / "ARCHITECTURE.md").read_text())
    assert len(paths) > 30
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, missing


def test_paths_named_in_the_docs_exist():
    missing = [f"{doc.name}: {p}" for doc in DOCS for p in PATH.findall(doc.read_text())
               if not (ROOT / p).exists()]
    assert not missing, missing


def test_doc_citations_resolve():
    sources = [*ROOT.joinpath("qoq").rglob("*.py"), *ROOT.joinpath("tests").rglob("*.py"), *DOCS]
    broken = []
    for source in sources:
        for doc, anchor in CITATION.findall(source.read_text()):
            target = ROOT / doc
            if not target.exists() or anchor not in anchors(target):
                broken.append(f"{source.relative_to(ROOT)}: {doc}#{anchor}")
    assert not broken, broken


def test_code_cites_no_outside_spec():
    cited = [f"{p.relative_to(ROOT)}:{i}" for p in ROOT.joinpath("qoq").rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\bSPEC\b", line)]
    assert not cited, cited


def test_kernels_doc_stays_short():
    assert len((ROOT / "docs" / "kernels.md").read_text().splitlines()) <= 250


def _thousands(x: float) -> str:
    return f"{round(x):,}"


def test_llama3_throughput_figures_match_the_results():
    """Every Llama-3-8B end-to-end figure in the results JSON is what README.md and
    docs/serving.md print."""
    records = json.loads((ROOT / "benchmarks/results/e2e-h100.json").read_text())["records"]
    figures = [_thousands(r["tokens_per_s"]) for r in records
               if r["config"] == "llama-3-8b" and r.get("tokens_per_s")]
    assert len(figures) >= 8
    for doc in (ROOT / "README.md", ROOT / "docs" / "serving.md"):
        text = doc.read_text()
        assert not [f for f in figures if f not in text], doc.name


def test_readme_perplexities_come_from_the_results():
    records = json.loads((ROOT / "benchmarks/results/accuracy-smollm2-135m.json").read_text())
    records = records["records"] if isinstance(records, dict) else records
    measured = {f"{r['ppl']:.2f}" for r in records}
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| method | ppl |"):readme.index("W8A8 is lossless")]
    quoted = re.findall(r"\b\d{2}\.\d{2}\b(?!%)", table)
    assert quoted and not [q for q in quoted if q not in measured]


def documented_commands() -> list[tuple[str, str]]:
    """(doc, command) for every `qoq ...` line in a code block of the README or docs/, one
    command per line (continuation lines joined, trailing comments dropped)."""
    commands = []
    for doc in DOCS:
        blocks = doc.read_text().split("```")[1::2]
        for block in blocks:
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip().removeprefix("$ ")
                if line.startswith("qoq "):
                    commands.append((doc.name, line))
    return commands


def test_every_documented_command_parses():
    """Each `qoq` command the docs show is one the CLI takes as written: its subcommand exists and
    every option is spelled and valued as the parser wants (the commands themselves need models,
    GPUs or minutes; test_cli.py runs the CPU ones). In a synopsis, `[--opt VALUE]` groups are
    optional: their options must exist; the rest must parse."""
    import argparse
    import shlex

    from qoq.cli import build_parser

    def options(parser) -> set[str]:
        found = set()
        for action in parser._actions:
            found.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    found |= options(sub)
        return found

    known = options(build_parser())
    commands = documented_commands()
    assert len(commands) >= 15
    for doc, line in commands:
        optional = re.findall(r"\[([^\]]*)\]", line)
        for flag in re.findall(r"--[\w-]+", " ".join(optional)):
            assert flag in known, f"{doc}: `{line}` names {flag}, which no qoq command takes"
        words = shlex.split(re.sub(r"\[[^\]]*\]", " ", line), comments=True)
        try:
            build_parser().parse_args(words[1:])
        except SystemExit:
            raise AssertionError(f"{doc}: `{line}` does not parse") from None
