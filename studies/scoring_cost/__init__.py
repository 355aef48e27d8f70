"""Scoring cost (issue item 4): default importance scoring's peak memory and time against checkpointed training
(`measure.py`; README.md has the commands and the 1.5B time target's plan)."""
