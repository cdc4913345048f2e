"""HuggingFace transformers bf16 `generate` with a static cache: the external baseline."""

from __future__ import annotations

import time

import torch

from qoq.bench.random_model import bundled_config


def hf_config(config_name: str):
    import transformers

    cfg = bundled_config(config_name)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[cfg.architecture]
    return cls(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
               num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
               num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
               rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_position_embeddings,
               tie_word_embeddings=cfg.tie_word_embeddings)


@torch.inference_mode()
def hf_throughput(config_name: str, batch: int, input_len: int, output_len: int) -> dict:
    """Generated tokens per second of `generate` (greedy, EOS ignored), prefill included."""
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf_config(config_name), dtype=torch.bfloat16).eval()
    vocab = model.config.vocab_size
    gen_kwargs = dict(do_sample=False, cache_implementation="static", pad_token_id=0, eos_token_id=None)
    try:
        ids = torch.randint(0, vocab, (batch, input_len), device="cuda")

        def run():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                                  min_new_tokens=output_len, **gen_kwargs)

        # transformers compiles the static-cache decode step on the first call with these shapes:
        # an identical untimed run first, so the timed one measures its best steady state.
        run()
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = run()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        generated = (out.shape[1] - input_len) * batch
        return {"system": "hf-transformers", "precision": "w16a16kv16", "group_size": -1, "batch": batch,
                "input_len": input_len, "output_len": output_len, "tokens_per_s": generated / seconds,
                "seconds": seconds, "roofline_tokens_per_s": None}
    finally:
        del model
        torch.cuda.empty_cache()
