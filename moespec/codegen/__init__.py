"""Code generation for ``target.backend: triton``: Triton kernels rendered from jinja2 templates
(``templates/triton/``) for one specialisation (activation, glu, bias, dtype, arch), loaded as
Python modules, with block sizes from per-arch tuning tables."""
