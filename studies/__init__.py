"""One-off studies of sprune_trainer (studies/README.md): each subfolder holds a study's code, README and results.
A package so that `python -m studies.accuracy.sweep` and `from studies.accuracy import ...` work."""
