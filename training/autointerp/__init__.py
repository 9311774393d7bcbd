"""Autointerp: a chat model explains every feature from its top-activating examples and rates how clear the
pattern is; detection (and fuzzing) scoring checks the explanation on held-out examples.

Modules: prompts (what is asked, and the strict parsers of the replies), client (the OpenAI-compatible chat
endpoint: key, retries, concurrency, cache), scoring (balanced accuracy), files (interp.jsonl), run (the
explain_features.py driver), plots (plot_interp.py). Nothing here imports a gatherer or the trainer.
"""
