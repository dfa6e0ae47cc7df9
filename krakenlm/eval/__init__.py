"""Zero-shot evaluation: the `krakenlm` lm-eval model (harness), local SuperGLUE tasks (tasks), reports.

Importing krakenlm.eval.harness registers the model with lm-eval; `python -m krakenlm.eval` runs
lm-eval's own command line with it registered.
"""
