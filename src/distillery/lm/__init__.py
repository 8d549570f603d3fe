"""Language-model distillation: causal LMs from transformers (``models``), sampling (``generate``),
the built-in corpus and tokenizer (``corpus``), token-level / sequence-level / on-policy KD
(``distill``), speculative decoding and draft distillation (``speculative``), and a teacher behind
an OpenAI-compatible HTTP API (``serve``, ``remote``). Needs the ``lm`` extra (transformers, tokenizers).
"""
