"""``python -m medjax.eval``'s flags and the run config's ``eval.*`` keys are one fact: a flag that
scores differently has a key of the same name and default (what ``medjax.train`` scores after
training), and ``eval/configured.py`` passes every key on."""
import dataclasses
import inspect

from medjax.config import EvalSection

# flags that say where the model / output / mesh are, not how to score
NOT_SCORING = {"model", "dtype", "output", "contamination", "list_tasks", "mesh", "help"}


def test_every_scoring_flag_is_an_eval_key_with_its_default():
    from medjax.eval.__main__ import build_parser
    keys = {f.name: f.default for f in dataclasses.fields(EvalSection)}
    flags = {a.dest: a.default for a in build_parser()._actions}
    scoring = set(flags) - NOT_SCORING
    assert scoring - set(keys) == set(), "flags without an eval.* key"
    for name in scoring - {"tasks"}:          # the CLI's default task list is multimedqa
        assert flags[name] == keys[name], (name, flags[name], keys[name])


def test_the_config_eval_passes_every_scoring_key():
    import medjax.eval.configured as configured
    from medjax.eval.runner import evaluate
    source = inspect.getsource(configured.evaluate_section)
    passed = {n for n in inspect.signature(evaluate).parameters if f"{n}=" in source}
    renamed = {"batch_tokens": "tokens_per_batch"}
    for key in {f.name for f in dataclasses.fields(EvalSection)} - {"tasks", "data_dir", "before_training"}:
        assert renamed.get(key, key) in passed, key
