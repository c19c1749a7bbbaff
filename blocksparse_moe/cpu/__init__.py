"""CPU implementations (torch, no Triton) of the products and permutes.

These are what users get on CPU tensors when ``TRITON_INTERPRET`` is unset; ``ops.py``
reaches them only through ``backend.select``.
"""
