"""Benchmarks of triton_gelu against PyTorch: ``python -m bench`` (see ``__main__.py``)."""
