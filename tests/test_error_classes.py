"""One family of user errors, stated once: every error class lives in medjax/errors.py, and no
module gives one a second name (``PathError = ConfigError`` made three names for one class).

Scanned statically (``ast``) over medjax/: a class deriving from an exception outside
medjax/errors.py, or a module-level ``XError = YError``, fails unless it is allowed below with
the reason."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medjax"
EXCEPTION_BASES = ("Error", "Exception", "Interrupt", "Exit", "Warning")
# Not user errors (they are not a ``UserError``; no bad input causes them), so they are not
# medjax.errors' family: how a training run ended, caught by ``python -m medjax.train``.
ALLOWED_CLASSES = {
    "medjax/train/loop.py:TrainingDiverged": "the loss went non-finite: exit 3, not a user error",
    "medjax/train/loop.py:TrainingInterrupted": "preemption signal: checkpoint saved, exit 128+N",
    # the server's HTTP answers: control flow between the engine and the app, never a CLI error
    "medjax/serve/protocol.py:ApiError": "a 4xx answer to one request; the server keeps serving",
    "medjax/serve/engine.py:QueueFull": "the waiting queue is full: HTTP 429",
    "medjax/serve/engine.py:Draining": "SIGTERM received, no new requests: HTTP 503",
    "medjax/serve/app.py:EngineFailed": "an engine step raised for this request: HTTP 500",
}
ALLOWED_ALIASES: set[str] = set()      # none: every alias is gone (CompilePlanError → ConfigError)


def _name(node) -> str:
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def error_definitions(package: Path = PACKAGE) -> tuple[list[str], list[str]]:
    """(exception classes outside errors.py, module-level aliases of an error class)."""
    classes, aliases = [], []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.ClassDef) and rel != "medjax/errors.py"
                    and any(_name(b).endswith(EXCEPTION_BASES) for b in node.bases)):
                classes.append(f"{rel}:{node.name}")
        for node in tree.body:
            if (isinstance(node, ast.Assign) and _name(node.value).endswith(EXCEPTION_BASES)
                    and any(_name(t).endswith(EXCEPTION_BASES) for t in node.targets)):
                aliases += [f"{rel}:{_name(t)}" for t in node.targets]
    return classes, aliases


def test_error_classes_are_stated_once_in_medjax_errors():
    classes, aliases = error_definitions()
    assert [c for c in classes if c not in ALLOWED_CLASSES] == [], \
        "define user errors in medjax/errors.py (or allow a non-user exception here, with the reason)"
    assert [a for a in aliases if a not in ALLOWED_ALIASES] == [], \
        "raise the medjax.errors class itself instead of a second name for it"


def test_the_scan_finds_what_it_forbids(tmp_path):
    """The scan is not vacuous: an alias and a stray class in a package are both reported."""
    pkg = tmp_path / "medjax"
    pkg.mkdir()
    (pkg / "errors.py").write_text("class UserError(ValueError):\n    pass\n")
    (pkg / "bad.py").write_text("from medjax.errors import UserError\nOtherError = UserError\n"
                                "class StrayError(UserError):\n    pass\n")
    classes, aliases = error_definitions(pkg)
    assert classes == ["medjax/bad.py:StrayError"] and aliases == ["medjax/bad.py:OtherError"]
