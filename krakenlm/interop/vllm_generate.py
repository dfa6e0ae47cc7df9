"""Greedy tokens of exported models through vLLM's offline engine, several models in one process (one
import of vLLM), printed as JSON on the last line. Runs with the vLLM venv's python (``vllm_process.
greedy_tokens`` starts it; the tests and `krakenlm doctor` read it):

    python -m krakenlm.interop.vllm_generate REQUEST.json
    # {"models": [DIR, ...], "prompts": [[id, ...], ...], "max_tokens": N, "tp": T, "max_model_len": L}
    #   ->  {"DIR": [[id, ...], ...], ...}

fp32, eager (no graphs), seeded: the tokens are compared with krakenlm's, not timed.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path


def main(path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory
    from vllm.inputs import TokensPrompt

    request = json.loads(Path(path).read_text())
    sampling = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in request["prompts"]]
    result = {}
    for model in request["models"]:
        llm = LLM(model=model, dtype="float32", max_model_len=request.get("max_model_len", 128),
                  max_num_batched_tokens=256, max_num_seqs=32, enforce_eager=True, seed=0,
                  tensor_parallel_size=request.get("tp", 1))
        outputs = llm.generate(prompts, sampling, use_tqdm=False)
        result[model] = [list(out.outputs[0].token_ids) for out in outputs]
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
