"""Attention for short rows on CPU (`rlhf dpo`): transformers' SDPA, with keys and values padded to 16.

On CPU, torch's fused attention kernel works on a row's keys 16 at a time (one AVX-512 vector of fp32) and
does the remaining (key length mod 16) in scalar code. At the short rows of DPO pairs and rankings that
remainder is most of the work: on (32, 4, 15, 16) queries / keys / values one forward costs 548 us, with
the keys and values padded to 16 (the padding masked out) 141 us; forward + backward 957 vs 412 us.
So a pass over whole rows (training, scoring, prefill: queries as long as keys) gets its keys and values
padded to a multiple of 16 here, the padding masked out (a causal pass without a mask gets the causal mask):
the same attention, no extra model positions. Other calls (decoding, other devices) are transformers' SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PADDED_SDPA = "rlhf_padded_sdpa"
KEY_MULTIPLE = 16


def padded_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """`sdpa_attention_forward` with key / value / mask padded to a multiple of KEY_MULTIPLE keys (see above)."""
    length, extra = key.shape[2], -key.shape[2] % KEY_MULTIPLE
    whole_rows = query.shape[2] == length and (attention_mask is None or attention_mask.shape[-1] == length)
    if not extra or query.device.type != "cpu" or not whole_rows:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is None:  # what SDPA's is_causal flag would do, as a mask
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        attention_mask = torch.ones(length, length, dtype=torch.bool, device=query.device)
        attention_mask = attention_mask.tril() if causal else attention_mask
    key, value = F.pad(key, (0, 0, 0, extra)), F.pad(value, (0, 0, 0, extra))  # (B, H, S + extra, D)
    masked = False if attention_mask.dtype == torch.bool else torch.finfo(attention_mask.dtype).min
    attention_mask = F.pad(attention_mask, (0, extra), value=masked)  # (..., S, S + extra)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(PADDED_SDPA, padded_sdpa_attention)
AttentionMaskInterface.register(PADDED_SDPA, sdpa_mask)  # the masks transformers builds for SDPA


def use_padded_sdpa(model):
    """Switch a model that runs transformers' SDPA attention to `padded_sdpa_attention`; others are left as they are."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(PADDED_SDPA)
    return model
