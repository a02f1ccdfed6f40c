"""fluxq engine: quantized FLUX.1 checkpoints (GGUF, NF4) read, dequantized, quantized and inspected in torch.

Nothing in this package imports the WebUI (``modules``, ``backend``, ``gradio``) outside ``host/`` and ``ui/``.
"""

__version__ = "0.1.0"
