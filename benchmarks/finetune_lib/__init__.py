"""Parts of the IMDB fine-tuning benchmark (``benchmarks/finetune.py``).

- :mod:`.data`: the IMDB reviews from a CSV folder, an ``aclImdb`` folder or Hugging Face; the
  WordPiece tokenizer; length-bucketed batches; the synthetic stand-in.
- :mod:`.models`: the from-scratch Transformer classifier and the MiniLM classifier.
- :mod:`.train`: the training and evaluation loop, the measurements (step time, tokens/s, memory,
  profiler time shares, backends used) and the step-by-step equivalence check.
- :mod:`.report`: environment, table, JSON, plots, progress bars.
"""
