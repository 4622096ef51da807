"""c2disr: the C2D-ISR method in pure PyTorch.

Models (SwinIR-L, SRFormer-L, MambaIRv2-L, plain / HiT-style / C2D hierarchical encoding),
discrete and continuous heads, MATLAB-compatible bicubic resize, and the standard SR metrics.

This package imports only torch, numpy and pillow. It must never import ray, mlflow, boto3,
pyarrow or srplatform (a test checks this), so researchers can use the models alone.
"""

__version__ = "0.1.0"
