"""Optimizer training: fine-tune a causal LM on kept prompt pairs from Postgres (the paper's step 2).

``training.train`` is the run itself, ``training.config`` its typed configuration, ``training.data`` examples and
the train/eval split, ``training.gguf_export`` the GGUF writer, ``training.job`` the wiring that entry points use
(``bpo train`` and ``python -m training``).
"""
