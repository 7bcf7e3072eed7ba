"""``source.derive`` arithmetic, parsed with :mod:`ast` into Polars expressions.

Allowed: column names, numbers, ``+ - * /``, unary minus and parentheses.
Dotted names such as ``properties.price`` refer to a flattened column of that
name. Nothing is ever evaluated as Python.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from typing import Final

import polars as pl

from lapse.exceptions import ConfigError

__all__ = ["derive_expr"]

_BINARY: Final[dict[type[ast.operator], Callable[[pl.Expr, pl.Expr], pl.Expr]]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


def _build(node: ast.expr, names: list[str]) -> pl.Expr:
    name = _dotted(node)
    if name is not None:
        names.append(name)
        return pl.col(name).cast(pl.Float64, strict=False)
    if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, int | float)
        and not isinstance(node.value, bool)
    ):
        return pl.lit(float(node.value))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_build(node.left, names), _build(node.right, names))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        inner = _build(node.operand, names)
        return -inner if isinstance(node.op, ast.USub) else inner
    raise ValueError(f"{ast.unparse(node)!r} is not allowed")


def derive_expr(key: str, text: str) -> tuple[pl.Expr, list[str]]:
    """The expression for ``source.derive.<key>`` and the source columns it reads.

    >>> expr, names = derive_expr("revenue", "Quantity * UnitPrice")
    >>> names
    ['Quantity', 'UnitPrice']

    Raises
    ------
    ConfigError
        The text is not valid arithmetic over names and numbers.
    """
    try:
        tree = ast.parse(text.strip(), mode="eval")
        names: list[str] = []
        expr = _build(tree.body, names)
    except (SyntaxError, ValueError) as exc:
        detail = exc.msg if isinstance(exc, SyntaxError) else str(exc)
        raise ConfigError(
            f"source.derive.{key}: cannot use {text!r} ({detail}); "
            "write arithmetic over column names and numbers with + - * / and parentheses"
        ) from None
    return expr, names
