"""Hugging Face formats at the boundary: transformers model dirs in and out (lm-eval runs on our
model through nanochat/harness.py, not here).

    tokenizer.py   our BPE + chat renderer → tokenizer.json + a Jinja chat template (and back)
    convert.py     our state dict + GPTConfig ↔ transformers' `nanochat` model type (seed generation)
                   or our remote-code type `nanochat_hydra` (any configuration, e.g. the modern one)
    modeling.py    the remote-code wrapper shipped in an export (a PreTrainedModel over nanochat/gpt.py)
    export.py      the files: a run dir → OUT_DIR (tmp dir + rename), OUT_DIR → (config, weights, tokenizer)
    card.py        the README.md model card written from the run

Heavy imports (transformers, tokenizers, safetensors) stay inside the functions that need them.
"""
