"""The README is executable documentation.

- Its feature table is the feature registry's and its configuration reference
  the config models', word for word (regenerate both with
  ``python tests/test_readme.py``).
- Every ``python`` and ``console`` block runs, in document order, in one temp
  folder that is also ``LAPSE_HOME``: console blocks are ``$ lapse ...`` lines
  run through the typer app (``CliRunner``, exit code 0 expected), python blocks
  run in one shared namespace.
- Blocks after a ``<!-- readme: syntax-only -->`` comment (the Airflow and
  Dagster examples) are only compiled, and ``cron`` blocks only checked line by
  line; ``bash``, ``text``, ``yaml`` and ``json`` blocks are prose.
"""

from __future__ import annotations

import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lapse.cli import app
from lapse.config_reference import _MEANINGS, config_keys, markdown_reference
from lapse.features import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"
FEATURES = "<!-- features:start -->", "<!-- features:end -->"
CONFIG = "<!-- config:start -->", "<!-- config:end -->"
SYNTAX_ONLY = "<!-- readme: syntax-only -->"
RUN = ("python", "console")
PROSE = ("bash", "text", "yaml", "json", "cron")

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


def _section(text: str, marks: tuple[str, str]) -> str:
    return text.split(marks[0], 1)[1].split(marks[1], 1)[0].strip()


def _replace(text: str, marks: tuple[str, str], body: str) -> str:
    head, rest = text.split(marks[0], 1)
    tail = rest.split(marks[1], 1)[1]
    return f"{head}{marks[0]}\n{body}\n{marks[1]}{tail}"


def expected_features() -> str:
    body = markdown_table().splitlines()[2:]  # drop the generated-file comment and the H1
    return "\n".join(re.sub(r"^## ", "### ", line) for line in body).strip()


# -- generated blocks ------------------------------------------------------------------------


def test_readme_feature_table_matches_registry() -> None:
    assert _section(README.read_text(encoding="utf-8"), FEATURES) == expected_features(), (
        "README feature table is stale: run `python tests/test_readme.py`"
    )


def test_readme_config_reference_matches_models() -> None:
    assert _section(README.read_text(encoding="utf-8"), CONFIG) == markdown_reference(), (
        "README configuration reference is stale: run `python tests/test_readme.py`"
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
    assert "make demo" in text
    assert "make test" in text


# -- examples --------------------------------------------------------------------------------


def test_every_block_has_a_known_language() -> None:
    unknown = [
        (b.line, b.lang)
        for b in blocks(README.read_text(encoding="utf-8"))
        if b.lang not in RUN + PROSE
    ]
    assert unknown == [], f"fenced blocks need one of {RUN + PROSE}: {unknown}"


def test_prose_blocks_do_not_pretend_to_run() -> None:
    """A ``$ lapse`` prompt belongs in a console block, which the examples test runs."""
    for b in blocks(README.read_text(encoding="utf-8")):
        if b.lang in PROSE:
            assert not re.search(r"^\$ ", b.code, re.M), f"README.md:{b.line}: use ```console"


def test_scheduling_examples_are_valid() -> None:
    found = blocks(README.read_text(encoding="utf-8"))
    cron = [b for b in found if b.lang == "cron"]
    syntax_only = [b for b in found if b.syntax_only]
    assert cron and len(syntax_only) >= 2  # cron, Airflow, Dagster
    for b in cron:
        for line in b.code.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                assert CRON_LINE.match(line), f"README.md:{b.line}: not a crontab line: {line!r}"
    for b in syntax_only:
        assert b.lang == "python", f"README.md:{b.line}: only python blocks can be syntax-only"
        compile(b.code, f"README.md:{b.line}", "exec")  # parses; airflow/dagster not imported


def _run_console(block: Block, runner: CliRunner) -> None:
    commands = [ln[2:] for ln in block.code.splitlines() if ln.startswith("$ ")]
    assert commands, f"README.md:{block.line}: a console block without a `$ lapse` line"
    for command in commands:
        argv = shlex.split(command, comments=True)
        assert argv[0] == "lapse", f"README.md:{block.line}: only lapse commands run: {command}"
        result = runner.invoke(app, argv[1:])
        assert result.exit_code == 0, (
            f"README.md:{block.line}: `{command}` exited with {result.exit_code}\n{result.output}"
        )


def test_readme_examples_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LAPSE_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    namespace: dict[str, object] = {"__name__": "readme"}
    ran: list[tuple[int, str, float]] = []
    for block in blocks(README.read_text(encoding="utf-8")):
        if block.lang not in RUN or block.syntax_only:
            continue
        started = time.perf_counter()
        if block.lang == "console":
            _run_console(block, runner)
        else:
            exec(compile(block.code, f"README.md:{block.line}", "exec"), namespace)
        ran.append((block.line, block.lang, time.perf_counter() - started))
    assert {lang for _, lang, _ in ran} == set(RUN)
    with capsys.disabled():
        timing = ", ".join(f"{line}: {s:.1f}s" for line, _, s in ran)
        print(f"\nREADME blocks (line: seconds): {timing}")


FIVE_STEPS = "## Bring your own data in five steps"


def five_steps() -> list[list[str]]:
    """The ``lapse`` command lines of the README's five steps, in order."""
    text = README.read_text(encoding="utf-8")
    (block, *_) = (b for b in blocks(text[text.index(FIVE_STEPS) :]) if b.lang == "bash")
    lines = [line.split("#")[0] for line in block.code.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("lapse ")]


def test_bring_your_own_data_in_five_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's five steps on Online Retail after the demo in the same folder, the
    proposal unedited: its own champion, per-order counts, no fee refilled, a ranking
    recency baseline, every customer scored."""
    import json

    import polars as pl

    from lapse import load_config
    from retail import reference_file

    reference = reference_file()
    monkeypatch.delenv("LAPSE_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    demo = runner.invoke(app, ["demo", "--users", "600"])
    assert demo.exit_code == 0, demo.output
    out: dict[str, str] = {}
    steps = five_steps()
    assert [argv[0] for argv in steps] == ["config", "validate", "train", "score"]
    for argv in steps:
        run = runner.invoke(app, [str(reference) if a == "orders.parquet" else a for a in argv])
        assert run.exit_code == 0, f"lapse {' '.join(argv)}:\n{run.output}"
        out[argv[0]] = run.output

    config = load_config(tmp_path / "lapse.yaml")
    assert config.source.order_id == "InvoiceNo" and config.models.name == "online_retail"
    assert "(source.order_id)" in out["validate"]  # purchases counted per order
    assert "registered online_retail version 1" in " ".join(out["train"].split())
    assert "champion" in out["train"]
    header = " ".join(out["score"].split())
    assert header.startswith("score run ") and "model 'online_retail' version 1" in header
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["churn"]["models"]["recency"]["roc_auc"] > 0.62  # eligibility that ranks
    scores = pl.read_parquet(tmp_path / "scores.parquet")
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
    assert reasons.str.contains("order").mean() > 0.9  # the purchase role's word


if __name__ == "__main__":
    text = README.read_text(encoding="utf-8")
    text = _replace(text, FEATURES, expected_features())
    text = _replace(text, CONFIG, markdown_reference())
    README.write_text(text, encoding="utf-8")
