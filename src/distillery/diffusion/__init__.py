"""Step distillation of diffusion and flow models: many sampling steps to few (``kind: diffusion``).

``process`` (vp / flow paths, prediction types, DDIM), ``mixture`` (the exact Gaussian-mixture teacher),
``nets`` (diffusers models and folders; the ``diffusion`` extra), ``methods`` (one engine task per
method), ``distill`` (the Python API), ``sample``, ``metrics``, ``recipe`` (the recipe kind).
"""
