"""The README's feature table is the registry's, word for word.

Regenerate it with ``python tests/test_readme.py`` after changing the registry.
"""

from __future__ import annotations

import re
from pathlib import Path

from lapse.features import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- features:start -->", "<!-- features:end -->"


def expected_block() -> str:
    body = markdown_table().splitlines()[2:]  # drop the generated-file comment and the H1
    return "\n".join(re.sub(r"^## ", "### ", line) for line in body).strip()


def readme_block(text: str) -> str:
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def test_readme_feature_table_matches_registry() -> None:
    assert readme_block(README.read_text(encoding="utf-8")) == expected_block(), (
        "README feature table is stale: run `python tests/test_readme.py`"
    )


def test_readme_shows_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert "make demo" in text
    assert "make test" in text


if __name__ == "__main__":
    text = README.read_text(encoding="utf-8")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    README.write_text(f"{head}{START}\n{expected_block()}\n{END}{tail}", encoding="utf-8")
