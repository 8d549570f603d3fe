"""Language-model distillation (the ``lm`` extra: transformers, tokenizers).

- ``models``: causal LMs from transformers (``CausalLM``, presets, ``save_lm`` / ``load_lm``);
- ``corpus``: the built-in stdlib corpus, its byte-level BPE and ``TokenData`` blocks;
- ``generate``: cached sampling (temperature, top-k, top-p, greedy);
- ``distill``: token-level, sequence-level and on-policy KD over the engine, perplexity;
- ``config`` / ``run``: ``kind: lm`` recipes and ``distillery lm``;
- ``speculative`` and ``adaspec``: speculative decoding, its metrics, AdaSPEC draft distillation;
- ``serve`` and ``remote``: a model behind the OpenAI completions and chat-completions APIs, and a teacher
  read from one (concurrent, resumable);
- ``chat``: chat and instruction data (templates, assistant-only masks, packing with positions);
- ``reasoning``: the built-in arithmetic word-problem task and its verifier;
- ``traces``: teacher answers (local or remote), verifier filters, answer accuracy;
- ``cross``: distillation across tokenizers (token pairs for ULD, spans for GOLD);
- ``lora``: LoRA students through PEFT;
- ``logit_codec``: compact top-k teacher log-probabilities.
The token losses themselves are ``distillery.losses.tokens`` (cross-tokenizer: ``losses.cross_tokenizer``).
"""
