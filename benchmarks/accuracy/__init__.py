"""Accuracy study (issue 8): sparse-neuron fine-tuning vs LoRA / DoRA / full FT on commonsense reasoning,
as parallel runs of recipes/llama_commonsense.py. Run `python benchmarks/accuracy/sweep.py --help`.

    grid.py       the run list: configs, learning-rate grids, seeds, the parameter budget arithmetic
    launcher.py   P subprocesses at a time, resumable, time budget + hard deadline, one log line per run
    tuning.py     best learning rate per method family from the validation runs -> tuned_lr.json
    aggregate.py  results.json of every run -> accuracy.json / .csv / .png / .md (also runnable alone)
    run_results.py  a run's results.json, plain or gzipped (committed runs are gzipped to keep the tree small)
    targets.py    chance / best-constant-answer baselines and the issue's target checks, for aggregate
    column_energy.py  diagnostic: input-activation energy carried by each criterion's column selection
    sweep.py      the command line: phases tune / test / all
"""
