"""Language-model distillation (the ``lm`` extra: transformers, tokenizers).

- ``models``: causal LMs from transformers (``CausalLM``, presets, ``save_lm`` / ``load_lm``);
- ``corpus``: the built-in stdlib corpus, its byte-level BPE and ``TokenData`` blocks;
- ``generate``: cached sampling (temperature, top-k, top-p, greedy);
- ``distill``: token-level, sequence-level and on-policy KD over the engine, perplexity;
- ``config`` / ``run``: ``kind: lm`` recipes and ``distillery lm``;
- ``speculative`` and ``adaspec``: speculative decoding, its metrics, AdaSPEC draft distillation;
- ``serve`` and ``remote``: a model behind the OpenAI completions API, and a teacher read from one.
The token losses themselves are ``distillery.losses.tokens``.
"""
