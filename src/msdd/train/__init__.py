"""Stage 1 (`stage1.py`), the stage-2 distillers (`distiller.py`, `distill.py`, `distill_ssdd.py`), the loop
they share (`loop.py`) and its pieces: checkpoints, EMA, optimiser, data order, RNG state, signals, budgets."""
