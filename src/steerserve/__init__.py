"""steerserve: an OpenAI-compatible server that steers language models at decoding time.

Subpackages, as the design card names them: `server` (HTTP), `decoding` (the engine),
`kernels` (Triton kernels with PyTorch references) and `adapters` (LoRA, steering vectors,
sparse autoencoders).
"""
