"""How a model is run: decode-shaped forwards at padded shapes, replayed as CUDA graphs on CUDA
(`graphs.py`), and sampling (`sampling.py`)."""
