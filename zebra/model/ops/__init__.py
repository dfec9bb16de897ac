"""The kernels of the Zebra model and the choice between them.

`ssd.py` holds Mamba2's SSD scan (its sequential definition beside the chunked scan) and depthwise conv in PyTorch,
and calls mamba_ssm / causal-conv1d where the backend says so; `flash_decode.py`, `fused_*.py` are the project's
Triton kernels (`triton_util.py`: what they share).

Only relative imports between these files: an export carries them flat, next to the model's own files.
"""
