"""Remote code for transformers: our GPT (nanochat/gpt.py, shipped next to this file) as a PreTrainedModel.

An export with `--remote-code` (every modern-generation model) copies this file, nanochat/gpt.py and
nanochat/attention.py into OUT_DIR with `from nanochat.` imports made relative, so the math transformers
runs is this project's own module, not a second copy. Load with
`AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)`.

generate(): the KV cache is ours (gpt.KVCache), grown by doubling as the sequence lengthens; rows of a
batch must have equal lengths (no padding: attention_mask must be all ones) and beam search is not
supported (it would reorder cache rows).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from nanochat.gpt import GPT, GPTConfig, KVCache


class NanochatHydraConfig(PreTrainedConfig):
    model_type = "nanochat_hydra"

    def __init__(self, nanochat_hydra: Optional[dict] = None, **kwargs):
        self.nanochat_hydra = nanochat_hydra or {"gpt_config": {}}
        super().__init__(**kwargs)


class GrowingKVCache:
    """Our preallocated KVCache, reallocated at twice the size when a forward would overflow it."""

    def __init__(self) -> None:
        self.kv: Optional[KVCache] = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.kv is None else int(self.kv.pos.max())

    def reserve(self, model: GPT, batch: int, need: int) -> KVCache:
        old = self.kv
        if old is not None and old.batch_size != batch:
            raise ValueError(f"batch changed from {old.batch_size} to {batch} rows mid-generation")
        if old is None or need > old.max_len:
            size = min(max(need, 2 * (old.max_len if old else 64)), model.rotary_len)
            new = KVCache.for_model(model, batch, size)
            if old is not None:   # every row carried over: keys, values, position
                for row in range(batch):
                    new.copy_rows_from(old, row, [row])
            self.kv = new
        return self.kv


class NanochatHydraForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanochatHydraConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def __init__(self, config: NanochatHydraConfig):
        super().__init__(config)
        self.model = GPT(GPTConfig(**config.nanochat_hydra["gpt_config"]))
        self._rope_ready = False
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False                      # our own cache, made in forward

    def _init_weights(self, module) -> None:
        pass                              # every weight comes from the checkpoint

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def set_input_embeddings(self, value) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[GrowingKVCache] = None, use_cache: Optional[bool] = None,
                labels: Optional[torch.LongTensor] = None, **kwargs) -> CausalLMOutputWithPast:
        if not self._rope_ready:          # non-persistent buffer: computed, never loaded
            self.model.init_rotary()
            self._rope_ready = True
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("nanochat_hydra runs unpadded batches only: give rows of equal length "
                             "(attention_mask all ones), or batch size 1")
        kv = None
        if use_cache:
            cache = cache if isinstance(cache, GrowingKVCache) else GrowingKVCache()
            kv = cache.reserve(self.model, input_ids.size(0), cache.get_seq_length() + input_ids.size(1))
        logits = self.model(input_ids, kv_cache=kv)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, use_cache=True, **kwargs):
        if isinstance(cache, GrowingKVCache):
            input_ids = input_ids[:, cache.get_seq_length():]
        return {"input_ids": input_ids, "cache": cache, "attention_mask": attention_mask, "use_cache": use_cache}
