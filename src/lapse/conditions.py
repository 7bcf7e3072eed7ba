"""The trigger condition language: a tokenizer, a recursive-descent parser and a
compiler to Polars expressions. Nothing here evaluates Python.

Grammar (lowest precedence first)::

    expr     := or
    or       := and ("or" and)*
    and      := not ("and" not)*
    not      := "not" not | compare
    compare  := sum [ ("==" | "!=" | "<" | "<=" | ">" | ">=") sum
                    | ["not"] "in" "[" literal ("," literal)* [","] "]"
                    | "is" ["not"] "null" ]
    sum      := product (("+" | "-") product)*
    product  := unary (("*" | "/") unary)*
    unary    := "-" unary | atom
    atom     := NUMBER | STRING | "true" | "false" | NAME | "(" expr ")"

Names are ASCII identifiers naming a column of the frame (a feature, a user
attribute, or at score time ``churn_risk``, ``churn_risk_percentile`` and
``risk_segment``). Values are numbers, strings or booleans; comparisons and
arithmetic with a null give null, ``and``/``or`` follow three-valued logic
(``false and null`` is false, ``true or null`` is true), ``x / 0`` is null, and
a condition that ends null does not fire. Arithmetic is in floating point.

Examples
--------
>>> import polars as pl
>>> frame = pl.DataFrame({"usage_count_28d": [60, 10], "plan": ["basic", "basic"]})
>>> cond = compile_condition('usage_count_28d >= 50 and plan == "basic"', frame.schema)
>>> frame.select(cond).to_series().to_list()
[True, False]
"""

from __future__ import annotations

import difflib
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

import polars as pl

from lapse.exceptions import ExprError

__all__ = [
    "MAX_DEPTH",
    "MAX_LENGTH",
    "Node",
    "compile_condition",
    "names_in",
    "parse",
]

MAX_LENGTH: Final = 4000
MAX_DEPTH: Final = 64
_KEYWORDS: Final = frozenset({"and", "or", "not", "in", "is", "null", "true", "false"})
_CMP: Final = ("==", "!=", "<=", ">=", "<", ">")
_MIRROR: Final = {"==": "==", "!=": "!=", "<=": ">=", ">=": "<=", "<": ">", ">": "<"}
_PUNCT: Final = ("==", "!=", "<=", ">=", "<", ">", "+", "-", "*", "/", "(", ")", "[", "]", ",")
# what people coming from Python or SQL type, and what to write instead
_HINTS: Final = {
    "True": "true",
    "False": "false",
    "None": "null",
    "AND": "and",
    "OR": "or",
    "NOT": "not",
    "NULL": "null",
}

Type = Literal["number", "string", "boolean", "null"]


# -- tokens ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    kind: Literal["name", "number", "string", "op", "end"]
    text: str
    pos: int
    value: float | int | str | None = None


def _char_name(c: str) -> str:
    return f"U+{ord(c):04X} {unicodedata.name(c, 'unnamed character')}"


def tokenize(text: str, where: str = "") -> list[Token]:
    """Split ``text`` into tokens; raise :class:`ExprError` at the first bad character."""
    if len(text) > MAX_LENGTH:
        raise ExprError(
            f"expression is {len(text)} characters long, more than {MAX_LENGTH}; "
            "split it into several triggers",
            text,
            None,
            where,
        )
    out: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\r\n":
            i += 1
            continue
        if c.isascii() and (c.isalpha() or c == "_"):
            j = i + 1
            while j < n and text[j].isascii() and (text[j].isalnum() or text[j] == "_"):
                j += 1
            out.append(Token("name", text[i:j], i))
            i = j
            continue
        if c.isascii() and c.isdigit():
            j = i
            while j < n and text[j].isascii() and text[j].isdigit():
                j += 1
            is_float = False
            if j < n and text[j] == "." and j + 1 < n and text[j + 1].isdigit():
                is_float = True
                j += 1
                while j < n and text[j].isascii() and text[j].isdigit():
                    j += 1
            if j < n and text[j] in "eE":
                k = j + 1
                if k < n and text[k] in "+-":
                    k += 1
                if k < n and text[k].isascii() and text[k].isdigit():
                    is_float = True
                    j = k
                    while j < n and text[j].isascii() and text[j].isdigit():
                        j += 1
            if j < n and text[j].isascii() and (text[j].isalpha() or text[j] == "_"):
                raise ExprError("a name cannot start with a digit", text, i, where)
            raw = text[i:j]
            value: float | int = float(raw) if is_float else int(raw)
            if isinstance(value, int) and abs(value) > 2**53:
                raise ExprError(f"number {raw} is too large", text, i, where)
            out.append(Token("number", raw, i, value))
            i = j
            continue
        if c in "\"'":
            j, chars = i + 1, []
            while True:
                if j >= n:
                    raise ExprError("string is not closed", text, i, where)
                d = text[j]
                if d == c:
                    break
                if d == "\\":
                    if j + 1 >= n:
                        raise ExprError("string is not closed", text, i, where)
                    esc = text[j + 1]
                    mapped = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t"}.get(esc)
                    if mapped is None:
                        raise ExprError(
                            f"unknown escape \\{esc} in a string (use \\\\, \\\", \\', \\n, \\t)",
                            text,
                            j,
                            where,
                        )
                    chars.append(mapped)
                    j += 2
                    continue
                chars.append(d)
                j += 1
            out.append(Token("string", text[i : j + 1], i, "".join(chars)))
            i = j + 1
            continue
        for p in _PUNCT:
            if text.startswith(p, i):
                out.append(Token("op", p, i))
                i += len(p)
                break
        else:
            if c == "=":
                raise ExprError("'=' is not a comparison; write '=='", text, i, where)
            if c == ".":
                raise ExprError(
                    "'.' is not allowed: no attribute access, numbers need a digit before "
                    "the point",
                    text,
                    i,
                    where,
                )
            if c == "&" or c == "|" or c == "!":
                word = {"&": "and", "|": "or", "!": "not"}[c]
                raise ExprError(f"{c!r} is not an operator here; write {word!r}", text, i, where)
            what = repr(c) if c.isascii() and c.isprintable() else _char_name(c)
            raise ExprError(f"unexpected character {what}", text, i, where)
    out.append(Token("end", "", n))
    return out


# -- syntax tree -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """One node of the syntax tree.

    ``op`` is ``lit`` (``value``), ``name`` (``value`` is the name), ``neg``,
    ``not``, ``and``, ``or``, an arithmetic or comparison operator, ``in``,
    ``not in`` (``value`` is a tuple of literals), ``is null`` or ``is not null``.
    """

    op: str
    pos: int
    args: tuple[Node, ...] = ()
    value: object = None


class _Parser:
    def __init__(self, text: str, where: str) -> None:
        self.text = text
        self.where = where
        self.tokens = tokenize(text, where)
        self.i = 0
        self.depth = 0

    def error(self, message: str, pos: int) -> ExprError:
        return ExprError(message, self.text, pos, self.where)

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def at(self, *texts: str) -> bool:
        t = self.tok
        return t.kind in ("op", "name") and t.text in texts

    def take(self) -> Token:
        t = self.tokens[self.i]
        self.i += 1
        return t

    def expect(self, text: str, context: str) -> Token:
        if not self.at(text):
            raise self.error(
                f"expected {text!r} {context}, found {_describe(self.tok)}", self.tok.pos
            )
        return self.take()

    def parse(self) -> Node:
        if self.tok.kind == "end":
            raise self.error("the expression is empty", 0)
        node = self.or_()
        t = self.tokens[self.i]
        if t.kind != "end":
            if t.text == "(" and node.op == "name":
                raise self.error("calls are not supported", t.pos)
            if t.text == "[":
                raise self.error("indexing is not supported", t.pos)
            if t.text in _CMP and node.op in _CMP:
                raise self.error("comparisons cannot be chained; join them with 'and'", t.pos)
            raise self.error(
                f"unexpected {_describe(t)}; expected an operator such as 'and', 'or', '=='",
                t.pos,
            )
        return node

    def nested(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"nested more than {MAX_DEPTH} levels deep", self.tok.pos)

    def or_(self) -> Node:
        node = self.and_()
        while self.at("or"):
            t = self.take()
            node = Node("or", t.pos, (node, self.and_()))
        return node

    def and_(self) -> Node:
        node = self.not_()
        while self.at("and"):
            t = self.take()
            node = Node("and", t.pos, (node, self.not_()))
        return node

    def not_(self) -> Node:
        if self.at("not"):
            t = self.take()
            self.nested()
            node = Node("not", t.pos, (self.not_(),))
            self.depth -= 1
            return node
        return self.compare()

    def compare(self) -> Node:
        left = self.sum_()
        t = self.tok
        if t.kind == "op" and t.text in _CMP:
            self.take()
            node = Node(t.text, t.pos, (left, self.sum_()))
            if self.tok.kind == "op" and self.tok.text in _CMP:
                raise self.error(
                    "comparisons cannot be chained; join them with 'and'", self.tok.pos
                )
            return node
        if self.at("in"):
            self.take()
            return Node("in", t.pos, (left,), self.literal_list())
        if self.at("not") and self.tokens[self.i + 1].text == "in":
            self.take()
            self.take()
            return Node("not in", t.pos, (left,), self.literal_list())
        if self.at("is"):
            self.take()
            negate = self.at("not")
            if negate:
                self.take()
            if not self.at("null"):
                raise self.error(
                    f"expected 'null' after 'is{' not' if negate else ''}', found "
                    f"{_describe(self.tok)}",
                    self.tok.pos,
                )
            self.take()
            return Node("is not null" if negate else "is null", t.pos, (left,))
        return left

    def literal_list(self) -> tuple[object, ...]:
        self.expect("[", "after 'in'")
        items: list[object] = []
        while not self.at("]"):
            t = self.tok
            negative = False
            if self.at("-"):
                negative = True
                self.take()
                t = self.tok
            if t.kind in ("number", "string"):
                if negative and t.kind == "string":
                    raise self.error("'-' before a string", t.pos)
                self.take()
                v = t.value
                items.append(-v if negative and isinstance(v, int | float) else v)
            elif t.kind == "name" and t.text in ("true", "false") and not negative:
                self.take()
                items.append(t.text == "true")
            elif t.kind == "end":
                raise self.error("the list is not closed with ']'", t.pos)
            else:
                raise self.error(
                    f"a list after 'in' holds literals (numbers, strings, true, false), found "
                    f"{_describe(t)}",
                    t.pos,
                )
            if not self.at("]"):
                self.expect(",", "between list items")
        self.take()
        if not items:
            raise self.error("the list after 'in' is empty", self.tokens[self.i - 1].pos)
        return tuple(items)

    def sum_(self) -> Node:
        node = self.product()
        while self.at("+", "-"):
            t = self.take()
            node = Node(t.text, t.pos, (node, self.product()))
        return node

    def product(self) -> Node:
        node = self.unary()
        while self.at("*", "/"):
            t = self.take()
            node = Node(t.text, t.pos, (node, self.unary()))
        return node

    def unary(self) -> Node:
        if self.at("-"):
            t = self.take()
            self.nested()
            node = Node("neg", t.pos, (self.unary(),))
            self.depth -= 1
            return node
        return self.atom()

    def atom(self) -> Node:
        t = self.tok
        if t.kind == "number":
            self.take()
            return Node("lit", t.pos, value=t.value)
        if t.kind == "string":
            self.take()
            return Node("lit", t.pos, value=t.value)
        if t.kind == "name":
            if t.text in ("true", "false"):
                self.take()
                return Node("lit", t.pos, value=t.text == "true")
            if t.text == "null":
                raise self.error("null is only tested with 'is null' or 'is not null'", t.pos)
            if t.text in _KEYWORDS:
                raise self.error(f"expected a value, found the keyword {t.text!r}", t.pos)
            self.take()
            if self.at("("):
                raise self.error("calls are not supported", self.tok.pos)
            return Node("name", t.pos, value=t.text)
        if t.kind == "op" and t.text == "(":
            self.take()
            self.nested()
            node = self.or_()
            self.depth -= 1
            if not self.at(")"):
                if self.tok.kind == "end":
                    raise self.error("'(' is not closed", t.pos)
                raise self.error(f"expected ')', found {_describe(self.tok)}", self.tok.pos)
            self.take()
            return node
        if t.kind == "end":
            raise self.error("the expression ends too early; a value is missing", t.pos)
        raise self.error(f"expected a value, found {_describe(t)}", t.pos)


def _describe(t: Token) -> str:
    if t.kind == "end":
        return "the end of the expression"
    if t.kind == "name":
        return f"keyword {t.text!r}" if t.text in _KEYWORDS else f"name {t.text!r}"
    return f"{t.kind} {t.text!r}" if t.kind != "op" else repr(t.text)


def parse(text: str, where: str = "") -> Node:
    """Parse ``text`` into a syntax tree; ``where`` (e.g. a config key) prefixes errors."""
    if not isinstance(text, str):
        raise ExprError(
            f"expected an expression string, got {type(text).__name__}", "", None, where
        )
    return _Parser(text, where).parse()


def names_in(node: Node) -> list[str]:
    """Column names the expression reads, in order of first use."""
    out: list[str] = []
    stack = [node]
    while stack:
        n = stack.pop()
        if n.op == "name" and n.value not in out:
            out.append(str(n.value))
        stack.extend(reversed(n.args))
    return out


# -- compiler ----------------------------------------------------------------------------------


def _type_of_dtype(dtype: pl.DataType) -> Type | None:
    if dtype.is_numeric():
        return "number"
    if dtype == pl.Boolean:
        return "boolean"
    if dtype in (pl.String, pl.Categorical, pl.Enum) or isinstance(dtype, pl.Categorical | pl.Enum):
        return "string"
    if dtype == pl.Null:
        return "null"
    return None


def _type_of_value(v: object) -> Type:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int | float):
        return "number"
    return "string"


class _Compiler:
    def __init__(self, text: str, schema: Mapping[str, pl.DataType], where: str) -> None:
        self.text = text
        self.schema = schema
        self.where = where

    def error(self, message: str, pos: int) -> ExprError:
        return ExprError(message, self.text, pos, self.where)

    def compile(self, node: Node) -> tuple[pl.Expr, Type]:
        op = node.op
        if op == "lit":
            return pl.lit(node.value), _type_of_value(node.value)
        if op == "name":
            return self.name(node)
        if op == "neg":
            e, t = self.compile(node.args[0])
            self.want(t, "number", "'-'", node)
            return -e.cast(pl.Float64), "number"
        if op == "not":
            e, t = self.compile(node.args[0])
            self.want(t, "boolean", "'not'", node)
            return ~e, "boolean"
        if op in ("and", "or"):
            (a, ta), (b, tb) = self.compile(node.args[0]), self.compile(node.args[1])
            self.want(ta, "boolean", f"the left side of {op!r}", node.args[0])
            self.want(tb, "boolean", f"the right side of {op!r}", node.args[1])
            return (a & b if op == "and" else a | b), "boolean"
        if op in ("+", "-", "*", "/"):
            (a, ta), (b, tb) = self.compile(node.args[0]), self.compile(node.args[1])
            if ta != "number" or tb != "number":
                raise self.error(
                    f"type mismatch: {op!r} needs numbers, got {ta} {op} {tb}", node.pos
                )
            a, b = a.cast(pl.Float64), b.cast(pl.Float64)
            if op == "+":
                return a + b, "number"
            if op == "-":
                return a - b, "number"
            if op == "*":
                return a * b, "number"
            return pl.when(b != 0).then(a / b).otherwise(None), "number"
        if op in _CMP:
            (a, ta), (b, tb) = self.compile(node.args[0]), self.compile(node.args[1])
            if ta != tb:
                raise self.error(f"type mismatch: cannot compare {ta} with {tb}", node.pos)
            if op not in ("==", "!=") and ta == "boolean":
                raise self.error(f"type mismatch: {op!r} does not order booleans", node.pos)
            if not names_in(node.args[0]) and names_in(node.args[1]):
                # the column on the left: polars 2.1 gives one row for `literal == when(...)`
                a, b, op = b, a, _MIRROR[op]
            ops = {
                "==": a.eq(b),
                "!=": a.ne(b),
                "<": a.lt(b),
                "<=": a.le(b),
                ">": a.gt(b),
                ">=": a.ge(b),
            }
            return ops[op], "boolean"
        if op in ("in", "not in"):
            e, t = self.compile(node.args[0])
            values = node.value
            assert isinstance(values, tuple)
            kinds = {_type_of_value(v) for v in values}
            if len(kinds) > 1:
                raise self.error(
                    f"type mismatch: the list mixes {' and '.join(sorted(kinds))}", node.pos
                )
            (kind,) = kinds
            if kind != t:
                raise self.error(
                    f"type mismatch: cannot test a {t} {op} a list of {kind}", node.pos
                )
            # is_in gives false for a null value; keep null-in-null-out like '=='
            member = pl.when(e.is_null()).then(None).otherwise(e.is_in(list(values)))
            return (member if op == "in" else ~member), "boolean"
        if op in ("is null", "is not null"):
            e, _ = self.compile(node.args[0])
            return (e.is_null() if op == "is null" else e.is_not_null()), "boolean"
        raise AssertionError(op)  # pragma: no cover

    def want(self, got: Type, want: Type, what: str, node: Node) -> None:
        if got != want:
            raise self.error(f"type mismatch: {what} needs a {want}, got a {got}", node.pos)

    def name(self, node: Node) -> tuple[pl.Expr, Type]:
        name = str(node.value)
        if name not in self.schema:
            hint = _HINTS.get(name)
            if hint:
                raise self.error(f"unknown name {name!r}; write {hint!r}", node.pos)
            close = difflib.get_close_matches(name, list(self.schema), n=3, cutoff=0.6)
            tip = (
                f"; did you mean {', '.join(close)}?"
                if close
                else "; it is neither a feature nor a user attribute of these rows"
            )
            raise self.error(f"unknown name {name!r}{tip}", node.pos)
        dtype = self.schema[name]
        t = _type_of_dtype(dtype)
        if t is None:
            raise self.error(
                f"{name!r} is of type {dtype}, which conditions cannot use "
                "(numbers, strings and booleans only)",
                node.pos,
            )
        return pl.col(name), t


def compile_condition(text: str, schema: Mapping[str, pl.DataType], *, where: str = "") -> pl.Expr:
    """Compile a condition over the columns of ``schema`` into a boolean Polars expression.

    The expression is null where the condition is unknown (a null input); callers
    fill nulls with false to mean "did not fire".

    Raises
    ------
    ExprError
        A syntax error (with a caret under the position), an unknown name (with
        the closest names), a type mismatch (naming both types), or a condition
        that is not true/false.
    """
    tree = parse(text, where)
    expr, t = _Compiler(text, schema, where).compile(tree)
    if t != "boolean":
        raise ExprError(f"a condition must be true or false, this is a {t}", text, tree.pos, where)
    if not names_in(tree):  # a constant: one value per row, not a single scalar
        return pl.repeat(expr, pl.len())
    return expr
