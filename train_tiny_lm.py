"""Train a small GPT-NeoX language model and its BPE tokenizer on a dataset (default: the built-in corpus).

    python train_tiny_lm.py                                   # the project's models/tiny-stdlib
    python train_tiny_lm.py --dataset my.jsonl --output_dir models/my-lm
"""

from training.cli import run_cli
from training.tiny_lm import TinyLMConfig, train_tiny_lm

if __name__ == "__main__":
    run_cli(train_tiny_lm, __doc__.splitlines()[0], TinyLMConfig)
