"""GPU benchmark suite of sprune_trainer (issue 7): run `python benchmarks/run_all.py --help`."""
