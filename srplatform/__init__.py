"""srplatform: the C2D-ISR training platform (the design's "platform" layer).

Ray Data / Train / Tune, MLflow tracking and registry, object storage, the local stack and the
`c2d` command line. Depends on c2disr, never the reverse. Heavy imports (ray, mlflow, boto3,
pyarrow) happen inside the functions that need them, so `c2d --help` stays fast.
"""

__version__ = "0.1.0"
