"""`python -m krakenlm.eval ARGS`: lm-eval's command line with the `krakenlm` model registered.

lm-eval 0.4 finds models only in its own registry (no plugin entry points), so the model class must
be imported before lm-eval parses `--model krakenlm`; this wrapper does exactly that.
"""

from lm_eval.__main__ import cli_evaluate

import krakenlm.eval.harness  # noqa: F401  (registers the model)

if __name__ == "__main__":
    cli_evaluate()
