"""Local `evaluate` module folder: `glue_offline.py` must keep the folder's name for `evaluate.load` to find it."""
