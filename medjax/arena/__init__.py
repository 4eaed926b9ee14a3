"""Pairwise clinical judging with Bradley–Terry/Elo ratings: ``python -m medjax.arena``.

questions.py (question set) and rubric.py (judge prompt template) are checked first;
contestants.py loads models with the existing loaders; answers.py generates; judge.py compares
answers in both orders from the judge's log-probabilities; ratings.py fits Bradley–Terry on
the Elo scale with bootstrap intervals; leaderboard.py writes Markdown/JSON/PNG; store.py is
the JSONL audit log that doubles as the resume cache. Bad input raises the
medjax.errors family (DataError for the question file, ConfigError for options and the rubric).
"""
