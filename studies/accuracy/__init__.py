"""Accuracy studies (issues 8, 17): sparse-neuron fine-tuning vs LoRA / DoRA / full FT on commonsense reasoning,
as parallel runs of recipes/llama_commonsense.py. Run `python studies/accuracy/sweep.py --help`; README.md has
the commands of each study.

    studies.py    the studies (smollm2: issue 8, qwen15: issue 17): configs, lr grids, data sizes, targets
    grid.py       the pieces of a run list: configs, runs, the parameter budget arithmetic, model shapes
    launcher.py   P slots of subprocesses at a time, resumable, time budget + hard deadline, one log line per run
    tuning.py     best learning rate (and config) per method family from the validation runs -> tuned_lr.json
    aggregate.py  results.json of every run -> accuracy.json / .csv / .png / .md (also runnable alone)
    run_checks.py did a run really train: refusals (non-finite steps, NaN logs) and flags (constant answers)
    solo.py       the solo phase's memory / speed / scoring-time rows (each config alone on the GPU)
    tradeoff.py   accuracy against trainable params and against peak memory (accuracy_tradeoff.png)
    stats.py      means and stds over a config's seeds
    run_results.py  a run's results.json, plain or gzipped (committed runs are gzipped to keep the tree small)
    targets.py    chance / best-constant-answer baselines and the study's target checks, for aggregate
    column_energy.py  diagnostic: input-activation energy carried by each criterion's column selection
    sweep.py      the command line: phases tune / test / all / solo
"""
