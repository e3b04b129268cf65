"""How a model is run: chunked prefill, decode-shaped forwards (CUDA graphs), and sampling."""
