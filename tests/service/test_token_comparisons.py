"""Secrets are compared in constant time everywhere: a source scan (AST), fast.

A token, signature, password or key compared with ``==``/``!=`` (or ``in`` a
collection) leaks through timing how much of it a caller guessed right;
``hmac.compare_digest`` does not. The scan covers every package of the project,
so a new check written with ``==`` fails here.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("service", "trainer", "infra", "schemas", "winnow")
ALLOWED = {
    "service/config.py: token.strip() in users": "a token given twice in the settings: "
    "both sides are configured values, read once at startup",
}
"""Comparisons that never see a caller's input, with why."""
SECRET = re.compile(r"token|secret|signature|password|api_key|credential|signing_key", re.I)


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    if isinstance(node, ast.Call | ast.Subscript):
        return _name(node.func if isinstance(node, ast.Call) else node.value)
    return ""


def _secret(node: ast.AST) -> bool:
    """Whether a side of a comparison names a secret (public constants, ALL_CAPS, do not)."""
    parts = [p for p in _name(node).split(".") if p not in ("get_secret_value", "encode")]
    return any(SECRET.search(p) and not p.isupper() for p in parts[-2:])


def equality_on_secrets(source: str, filename: str = "<source>") -> list[str]:
    """``line: expression`` of each ==, !=, in or not in with a secret on a side."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        if not any(isinstance(op, ast.Eq | ast.NotEq | ast.In | ast.NotIn) for op in node.ops):
            continue
        if any(isinstance(side, ast.Constant) for side in sides):
            continue  # `token is None`, `token == ""`: no secret is compared
        if any(_secret(side) for side in sides):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_scan_finds_a_token_compared_with_equality() -> None:
    """Catches a scan that cannot fail (so the next test would pass on anything)."""
    source = (
        "if given == settings.admin_token.get_secret_value(): pass\n"
        "if request.headers['x'] != self._webhook_token: pass\n"
        "if signature in known_signatures: pass\n"
        "if token is None or token == '': pass\n"
        "if value in EXAMPLE_TOKENS: pass\n"
    )
    assert [line.split(":")[0] for line in equality_on_secrets(source)] == ["1", "2", "3"]


def test_no_secret_is_compared_with_equality_operators() -> None:
    """Catches a token, signature or key compared with ==, !=, in or not in (anything but
    a constant such as None or "" on the other side), instead of hmac.compare_digest."""
    found = [
        f"{path.relative_to(ROOT)}:{line}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for line in equality_on_secrets(path.read_text(), str(path))
        if f"{path.relative_to(ROOT)}:{line.partition(':')[2]}" not in ALLOWED
    ]
    assert found == [], "compare secrets with hmac.compare_digest:\n" + "\n".join(found)
