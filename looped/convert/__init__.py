"""Conversion from other checkpoints: the Llama family both ways (``llama``), an N-layer model's layers as a
``(k⊗L)``'s by a recursive initialisation (``recursive``)."""
