"""The peer stacks' sides of ``python -m medjax.bench peers``: scripts each peer venv's Python runs
by path (``.venv-easydel/bin/python medjax/bench/_peers/easydel_side.py ...``). They import
numpy, jax and their own stack, and ``protocol`` beside them: never medjax, which is not
installed in a peer venv."""
