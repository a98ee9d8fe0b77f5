"""The benchmark harness's library code (no command lines): the models and their static KV cache,
graph-mode steps, presets, the corpus and checkpoints, training, measurement, costs, verdicts,
reports and plots. The ``python -m bench.<name>`` entry points stand on it."""
