"""The README and the pages in ``docs/`` are executable documentation.

- The feature table in ``docs/features.md`` is the feature registry's and the
  key reference in ``docs/configuration.md`` the config models', word for word
  (regenerate both with ``python tests/test_readme.py``).
- Every ``python`` and ``console`` block runs as written: console blocks are
  ``$ lapse ...`` lines run through the typer app (``CliRunner``, exit code 0
  expected), each python block in a fresh namespace. The README's blocks run in
  document order in one temp folder that is also ``LAPSE_HOME`` (its first block
  is ``lapse demo``); each docs page runs in order in a copy of that folder, as a
  reader who followed the README would.
- Blocks after a ``<!-- readme: syntax-only -->`` comment (Airflow, Dagster,
  Spark) are compiled and may use no name they do not define; ``cron`` blocks are
  checked line by line; ``bash``, ``text``, ``yaml`` and ``json`` blocks are prose,
  but every ``lapse`` command line in a bash, text or cron block parses against
  the CLI (a synopsis line's options exist).
- Every relative link resolves to a file and, with ``#``, to one of its headings.
"""

from __future__ import annotations

import builtins
import json
import re
import shlex
import shutil
import symtable
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from itertools import takewhile
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import typer
from typer.core import TyperGroup
from typer.testing import CliRunner

from lapse import load_config
from lapse.cli import app
from lapse.config_reference import _MEANINGS, config_keys, markdown_reference
from lapse.features import markdown_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
FEATURES_PAGE = DOCS / "features.md"
CONFIG_PAGE = DOCS / "configuration.md"
FEATURES = "<!-- features:start -->", "<!-- features:end -->"
CONFIG = "<!-- config:start -->", "<!-- config:end -->"
SYNTAX_ONLY = "<!-- readme: syntax-only -->"
RUN = ("python", "console")
PROSE = ("bash", "text", "yaml", "json", "cron")
# Pages the README's map links to that other work writes: a link to one may dangle until it
# lands (none now).
PENDING: set[str] = set()

# minute hour day-of-month month day-of-week, each a number, range, list, step or *;
# or an @-shortcut; then the command
_CRON_FIELD = r"(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*"
CRON_LINE = re.compile(
    rf"^(@(reboot|yearly|annually|monthly|weekly|daily|midnight|hourly)"
    rf"|{_CRON_FIELD}\s+{_CRON_FIELD}\s+{_CRON_FIELD}\s+{_CRON_FIELD}\s+{_CRON_FIELD})\s+\S.*$"
)


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    syntax_only: bool


def blocks(text: str) -> list[Block]:
    """Fenced blocks in order, with the language and the syntax-only marker."""
    found: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\S*)\s*$", lines[i])
        if fence is None:
            i += 1
            continue
        start = i
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = [ln for ln in lines[:start] if ln.strip()]
        marked = bool(before) and before[-1].strip() == SYNTAX_ONLY
        found.append(Block(fence[1], "\n".join(lines[start + 1 : end]), start + 1, marked))
        i = end + 1
    return found


def page_blocks() -> Iterator[tuple[str, Block]]:
    """Every block of every page, with ``page:line`` to name it."""
    for page in PAGES:
        for b in blocks(page.read_text(encoding="utf-8")):
            yield f"{page.relative_to(ROOT)}:{b.line}", b


def runnable(page: Path) -> list[Block]:
    return [
        b for b in blocks(page.read_text(encoding="utf-8")) if b.lang in RUN and not b.syntax_only
    ]


def _section(text: str, marks: tuple[str, str]) -> str:
    return text.split(marks[0], 1)[1].split(marks[1], 1)[0].strip()


def _replace(text: str, marks: tuple[str, str], body: str) -> str:
    head, rest = text.split(marks[0], 1)
    tail = rest.split(marks[1], 1)[1]
    return f"{head}{marks[0]}\n{body}\n{marks[1]}{tail}"


def expected_features() -> str:
    return "\n".join(markdown_table().splitlines()[2:]).strip()  # no generated-file note, no H1


# -- generated blocks ------------------------------------------------------------------------


def test_feature_table_matches_registry() -> None:
    assert _section(FEATURES_PAGE.read_text(encoding="utf-8"), FEATURES) == expected_features(), (
        "docs/features.md's feature table is stale: run `python tests/test_readme.py`"
    )


def test_config_reference_matches_models() -> None:
    assert _section(CONFIG_PAGE.read_text(encoding="utf-8"), CONFIG) == markdown_reference(), (
        "docs/configuration.md's key reference is stale: run `python tests/test_readme.py`"
    )


def test_every_config_key_has_a_meaning() -> None:
    keys = {k.key: k for k in config_keys()}
    assert [k for k, v in keys.items() if not v.meaning] == []
    stale = [k for k in _MEANINGS if k not in keys]
    assert stale == [], f"meanings for keys that no longer exist: {stale}"


def test_config_reference_meanings_not_duplicated() -> None:
    from pydantic import BaseModel

    from lapse.config import LapseConfig

    described: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            key = prefix + (info.alias or name)
            if info.description and key in _MEANINGS:
                described.append(key)
            ann = info.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, key + ".")

    walk(LapseConfig, "")
    assert described == [], (
        f"these fields now have a description: drop them from _MEANINGS: {described}"
    )


def test_readme_shows_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    (setup, *_) = (b for b in blocks(text[text.index("## Two commands") :]) if b.lang == "bash")
    assert [line.split()[:2] for line in setup.code.splitlines()] == [
        ["make", "demo"],
        ["make", "test"],
    ]


# -- every block, every page -----------------------------------------------------------------


def test_every_block_has_a_known_language() -> None:
    unknown = [(where, b.lang) for where, b in page_blocks() if b.lang not in RUN + PROSE]
    assert unknown == [], f"fenced blocks need one of {RUN + PROSE}: {unknown}"


def test_prose_blocks_do_not_pretend_to_run() -> None:
    """A ``$ lapse`` prompt belongs in a console block, which the examples test runs."""
    for where, b in page_blocks():
        if b.lang in PROSE:
            assert not re.search(r"^\$ ", b.code, re.M), f"{where}: use ```console"


def undefined_names(code: str) -> list[str]:
    """Names a block reads at any depth that it neither defines nor imports (nor builtins)."""
    top = symtable.symtable(code, "block", "exec")
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    used: set[str] = set()

    def walk(table: symtable.SymbolTable) -> None:
        for s in table.get_symbols():
            bound = s.is_assigned() or s.is_imported() or s.is_parameter()
            if s.is_referenced() and (table is top or (s.is_global() and not bound)):
                used.add(s.get_name())
        for child in table.get_children():
            walk(child)

    walk(top)
    return sorted(used - defined - set(dir(builtins)))


def test_undefined_names_are_found() -> None:
    code = "import a\nb = a.x(c)\ndef f(d):\n    return d + e + b\n"
    assert undefined_names(code) == ["c", "e"]


def test_scheduling_and_syntax_only_examples_are_valid() -> None:
    found = list(page_blocks())
    cron = [(w, b) for w, b in found if b.lang == "cron"]
    syntax_only = [(w, b) for w, b in found if b.syntax_only]
    assert cron and len(syntax_only) >= 3  # cron; Airflow, Dagster, Spark
    for where, b in cron:
        for line in b.code.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                assert CRON_LINE.match(line), f"{where}: not a crontab line: {line!r}"
    for where, b in syntax_only:
        assert b.lang == "python", f"{where}: only python blocks can be syntax-only"
        compile(b.code, where, "exec")  # parses; airflow/dagster/pyspark not imported
        assert undefined_names(b.code) == [], f"{where}: a fresh reader's NameError"


# -- command lines in prose ------------------------------------------------------------------

PLACEHOLDER = re.compile(r"^\[|^[A-Z][A-Z_]*(\.\.\.)?\]?$")


@cache
def _cli() -> TyperGroup:
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    return group


def resolve(argv: list[str]) -> tuple[Any, typer.Context, list[str]]:
    """The (click) command an argv names (after ``lapse``), its context and the
    arguments left."""
    command: Any = _cli()
    ctx = typer.Context(command, info_name="lapse")
    args = list(argv)
    while isinstance(command, TyperGroup):
        assert args, f"`lapse {' '.join(argv)}` names no command"
        name = args.pop(0)
        found = command.get_command(ctx, name)
        assert found is not None, f"`lapse {' '.join(argv)}`: no command {name!r}"
        command, ctx = found, typer.Context(found, info_name=name, parent=ctx)
    return command, ctx, args


def _after_lapse(words: list[str]) -> list[str]:
    return words[next(i for i, w in enumerate(words) if w in ("lapse", ".venv/bin/lapse")) + 1 :]


def lapse_command_lines(code: str) -> Iterator[tuple[list[str], bool]]:
    """``lapse`` invocations in a prose block, lines that start with ``lapse`` or run
    ``.../bin/lapse``: (argv after ``lapse``, is a synopsis). A synopsis (``EVENTS``,
    ``[--config C]``) takes its indented continuation lines with it."""
    current: list[str] | None = None
    synopsis = False
    for line in [*code.splitlines(), ""]:
        if current is not None and synopsis and line.startswith(" ") and line.strip():
            current += line.split()
            continue
        if current is not None:
            yield current, synopsis
            current = None
        if not re.search(r"^lapse\s|\.venv/bin/lapse\s", line):  # not the diagram's " lapse score"
            continue
        words = _after_lapse(line.split())
        synopsis = any(PLACEHOLDER.match(w) for w in takewhile(lambda w: w[0] != "#", words))
        if synopsis:
            current = words
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)  # drops # comments
        lexer.whitespace_split = True  # words split at spaces and at && >> | ;
        tokens = list(lexer)
        argv = _after_lapse(tokens)
        argv = argv[: next((i for i, t in enumerate(argv) if set(t) <= set("();<>|&")), None)]
        current = argv


def _prose_lapse_lines() -> list[tuple[str, list[str], bool]]:
    found = []
    for where, b in page_blocks():
        if b.lang in ("bash", "text", "cron"):
            found += [(where, argv, syn) for argv, syn in lapse_command_lines(b.code)]
    return found


def test_lapse_command_lines_in_prose_parse() -> None:
    """`lapse sinks check sql` is wrong syntax; `lapse sinks check --sink sql` is not."""
    lines = _prose_lapse_lines()
    assert sum(1 for _, _, syn in lines if syn) >= 15 and sum(1 for *_, s in lines if not s) >= 15
    for where, argv, synopsis in lines:
        command, ctx, args = resolve(argv)
        if synopsis:
            known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
            named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", " ".join(args)))
            assert named <= known, f"{where}: `lapse {' '.join(argv)}`: no {named - known}"
            continue
        try:
            command.make_context(ctx.info_name, args, parent=ctx.parent)
        except typer.TyperException as error:  # click's UsageError: option, argument, count
            pytest.fail(f"{where}: `lapse {' '.join(argv)}`: {error.format_message()}")


def test_a_wrong_command_line_is_caught() -> None:
    command, ctx, args = resolve(["sinks", "check", "sql"])
    with pytest.raises(typer.TyperException, match="Missing parameter: sink"):
        command.make_context(ctx.info_name, args, parent=ctx.parent)
    command.make_context(ctx.info_name, ["--sink", "sql"], parent=ctx.parent)
    assert list(
        lapse_command_lines("0 2 * * *  cd /x && .venv/bin/lapse forget u1 >> log 2>&1")
    ) == [(["forget", "u1"], False)]


# -- links -----------------------------------------------------------------------------------


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens,
    a repeated anchor numbered from -1."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    fenced = False
    for line in text.splitlines():
        fenced = fenced != line.startswith("```")
        heading = re.match(r"^#{1,6} (.+)$", line)
        if fenced or heading is None:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading[1].strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        out.add(slug if n == 0 else f"{slug}-{n}")
        seen[slug] = n + 1
    return out


def test_relative_links_resolve() -> None:
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                if file.name not in PENDING:
                    broken.append(f"{page.name}: {target}")
                continue
            if anchor and file.is_file() and anchor not in anchors(file.read_text("utf-8")):
                broken.append(f"{page.name}: {target}")
    assert broken == []


# -- examples --------------------------------------------------------------------------------


def _run_console(block: Block, where: str, runner: CliRunner) -> None:
    commands = [ln[2:] for ln in block.code.splitlines() if ln.startswith("$ ")]
    assert commands, f"{where}: a console block without a `$ lapse` line"
    for command in commands:
        argv = shlex.split(command, comments=True)
        assert argv[0] == "lapse", f"{where}: only lapse commands run: {command}"
        result = runner.invoke(app, argv[1:])
        assert result.exit_code == 0, (
            f"{where}: `{command}` exited with {result.exit_code}\n{result.output}"
        )


def run_page(page: Path) -> list[tuple[int, str, float]]:
    """Run a page's blocks in order in the working directory; each python block in a
    fresh namespace. Returns (line, language, seconds) per block."""
    runner = CliRunner()
    ran: list[tuple[int, str, float]] = []
    for block in runnable(page):
        where = f"{page.relative_to(ROOT)}:{block.line}"
        started = time.perf_counter()
        if block.lang == "console":
            _run_console(block, where, runner)
        else:
            exec(compile(block.code, where, "exec"), {"__name__": "__docs__"})
        ran.append((block.line, block.lang, time.perf_counter() - started))
    return ran


@dataclass(frozen=True)
class ReadmeRun:
    home: Path
    ran: list[tuple[int, str, float]]


@pytest.fixture(scope="module")
def readme_home(tmp_path_factory: pytest.TempPathFactory) -> ReadmeRun:
    """A folder (also ``LAPSE_HOME``) where the README's blocks ran: the demo, the
    quickstart, the MLflow example."""
    home = tmp_path_factory.mktemp("readme")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAPSE_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(home)
        ran = run_page(README)
    return ReadmeRun(home, ran)


def _timing(page: Path, ran: list[tuple[int, str, float]]) -> str:
    return f"\n{page.relative_to(ROOT)} blocks (line: seconds): " + ", ".join(
        f"{line}: {s:.1f}s" for line, _, s in ran
    )


def test_readme_examples_run(readme_home: ReadmeRun, capsys: pytest.CaptureFixture[str]) -> None:
    assert {lang for _, lang, _ in readme_home.ran} == set(RUN)
    assert (readme_home.home / "demo" / "scores.parquet").is_file()
    with capsys.disabled():
        print(_timing(README, readme_home.ran))


@pytest.mark.parametrize("page", [p for p in PAGES[1:] if runnable(p)], ids=lambda p: p.name)
def test_docs_examples_run(
    page: Path,
    readme_home: ReadmeRun,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    home = tmp_path / "home"
    shutil.copytree(readme_home.home, home)
    monkeypatch.setenv("LAPSE_HOME", str(home))
    monkeypatch.chdir(home)
    ran = run_page(page)
    assert ran
    with capsys.disabled():
        print(_timing(page, ran))


FIVE_STEPS = "## Bring your own data in five steps"


def five_steps() -> list[list[str]]:
    """The ``lapse`` command lines of the README's five steps, in order."""
    text = README.read_text(encoding="utf-8")
    (block, *_) = (b for b in blocks(text[text.index(FIVE_STEPS) :]) if b.lang == "bash")
    lines = [line.split("#")[0] for line in block.code.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("lapse ")]


def test_bring_your_own_data_in_five_steps(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's five steps on Online Retail after the demo in the same folder, the
    proposal unedited: its own champion, per-order counts, no fee refilled, a ranking
    recency baseline, every customer scored."""
    from retail import reference_file

    reference = reference_file()
    readme: ReadmeRun = request.getfixturevalue("readme_home")  # the demo ran there
    home = tmp_path / "home"
    shutil.copytree(readme.home, home)
    monkeypatch.delenv("LAPSE_HOME", raising=False)
    monkeypatch.chdir(home)
    runner = CliRunner()
    out: dict[str, str] = {}
    steps = five_steps()
    assert [argv[0] for argv in steps] == ["config", "validate", "train", "score"]
    for argv in steps:
        run = runner.invoke(app, [str(reference) if a == "orders.parquet" else a for a in argv])
        assert run.exit_code == 0, f"lapse {' '.join(argv)}:\n{run.output}"
        out[argv[0]] = run.output

    config = load_config(home / "lapse.yaml")
    assert config.source.order_id == "InvoiceNo" and config.models.name == "online_retail"
    assert "(source.order_id)" in out["validate"]  # purchases counted per order
    assert "registered online_retail version 1" in " ".join(out["train"].split())
    assert "champion" in out["train"]
    header = " ".join(out["score"].split())
    assert header.startswith("score run ") and "model 'online_retail' version 1" in header
    metrics = json.loads((home / "report" / "metrics.json").read_text())
    assert metrics["churn"]["models"]["recency"]["roc_auc"] > 0.62  # eligibility that ranks
    scores = pl.read_parquet(home / "scores.parquet")
    assert scores.height > 4000 and set(scores["model_name"]) == {"online_retail"}
    fees = {str(v) for r in config.source.row_rules if r.event == "fee" for v in r.value}
    assert {"POST", "M"} <= fees
    refilled = set(scores["refill_sku"].drop_nulls())
    assert refilled and not refilled & fees
    # reasons in the shop's words, from the shipped model, for every explained record
    reasons = scores.filter(pl.col("risk_segment") == "high")["reasons"].explode().drop_nulls()
    assert reasons.len() > 100
    unreadable = reasons.filter(reasons.str.contains(r"_|\bnone\b|score|per active day"))
    assert unreadable.is_empty(), unreadable.head(5).to_list()
    # said in the purchase role's words (orders, buying, spend), never as "events"
    assert reasons.str.contains(r"order|bought|spend").mean() > 0.9


if __name__ == "__main__":
    for page, marks, body in [
        (FEATURES_PAGE, FEATURES, expected_features()),
        (CONFIG_PAGE, CONFIG, markdown_reference()),
    ]:
        page.write_text(_replace(page.read_text(encoding="utf-8"), marks, body), encoding="utf-8")
