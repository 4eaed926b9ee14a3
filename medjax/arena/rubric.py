"""The judge's prompt: a jinja2 template file the user can replace (``--rubric FILE``).

The template renders the judge's user turn from four fields: ``question``, ``reference``
(empty when the question row has none), ``answer_a`` (shown first) and ``answer_b``. It is
checked before any model loads: a syntax error or a field outside these four is one error
naming ``file:line``. The rendered text is wrapped in the judge's own chat template, and the
verdict is read from the judge's next-token log-probabilities of ``VERDICTS`` (see judge.py),
so the template should ask for exactly one of them.
"""
from __future__ import annotations

from dataclasses import dataclass

from medjax.errors import ConfigError

DEFAULT_RUBRIC = "pkg://medjax/assets/arena/clinical_rubric.jinja"
FIELDS = ("question", "reference", "answer_a", "answer_b")
VERDICTS = ("A", "B", "tie")        # first answer better, second answer better, tie


@dataclass
class Rubric:
    path: str
    source: str
    _template: object

    def render(self, question: str, reference: str | None, answer_a: str, answer_b: str) -> str:
        return self._template.render(question=question, reference=reference or "",
                                     answer_a=answer_a, answer_b=answer_b)


def load_rubric(path=DEFAULT_RUBRIC) -> Rubric:
    import jinja2
    from jinja2 import meta, nodes

    from medjax.chat_templates import sandbox
    from medjax.paths import resolve_path

    file = resolve_path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: no such rubric template")
    source = file.read_text(encoding="utf-8")
    env = sandbox(ConfigError)
    env.undefined = jinja2.StrictUndefined
    try:
        tree = env.parse(source, filename=str(file))
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"{file}:{e.lineno}: template syntax error: {e.message}") from None
    unknown = meta.find_undeclared_variables(tree) - set(FIELDS) - set(env.globals)
    if unknown:
        # The first line that reads an unknown name (the set holds no line numbers).
        line, name = min((n.lineno, n.name) for n in tree.find_all(nodes.Name)
                         if n.ctx == "load" and n.name in unknown)
        raise ConfigError(f"{file}:{line}: unknown template field {name!r} "
                         f"(the rubric can use {', '.join(FIELDS)})")
    return Rubric(str(file), source, env.from_string(source))
