"""`python -m krakenlm.eval ARGS`: lm-eval's command line with the `krakenlm` model registered.

lm-eval 0.4 finds models only in its own registry (no plugin entry points), so the model class must
be imported before lm-eval parses `--model krakenlm`; this wrapper does exactly that. It also spells
`checkpoint=PATH` in `--model_args` as lm-eval's own `pretrained=PATH`, the key lm-eval names its output
folder after (as for `hf` runs); any other key would give the folder a random name.
"""

import re
import sys

from lm_eval.__main__ import cli_evaluate

import krakenlm.eval.harness  # noqa: F401  (registers the model)


def _name_after_checkpoint(argv: list[str]) -> list[str]:
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--model_args" and i + 1 < len(out):
            out[i + 1] = re.sub(r"(^|,)checkpoint=", r"\1pretrained=", out[i + 1])
        elif arg.startswith("--model_args="):
            out[i] = re.sub(r"(=|,)checkpoint=", r"\1pretrained=", arg)
    return out


if __name__ == "__main__":
    sys.argv = _name_after_checkpoint(sys.argv)
    cli_evaluate()
