"""Functions of the core fit on a screen: none in `bot/core/` has a body over `LIMIT` lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "bot" / "core"
LIMIT = 60


def body_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the function's last line."""
    body = function.body
    has_docstring = (
        isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)
    )
    first = body[1] if has_docstring and len(body) > 1 else body[0]
    assert function.end_lineno is not None
    return function.end_lineno - first.lineno + 1


def long_functions(source: str, limit: int = LIMIT) -> list[tuple[str, int, int]]:
    """(name, line, body lines) of every function (nested ones too) whose body is over `limit` lines."""
    return [
        (node.name, node.lineno, lines)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (lines := body_lines(node)) > limit
    ]


def test_no_core_function_is_longer_than_the_limit() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line} {name}: {lines} lines"
        for path in sorted(CORE.rglob("*.py"))
        for name, line, lines in long_functions(path.read_text(encoding="utf-8"))
    ]
    assert not found, f"split these into small named helpers (limit {LIMIT} body lines):\n" + "\n".join(found)


def test_the_count_skips_the_docstring_and_catches_a_long_body() -> None:
    statements = "".join(f"    x{i} = {i}\n" for i in range(LIMIT))
    fits = f'def f():\n    """Doc."""\n{statements}'
    assert long_functions(fits) == []
    assert long_functions(fits + "    return x0\n") == [("f", 1, LIMIT + 1)]
