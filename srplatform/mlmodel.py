"""SR models as MLflow models: log a fine-tuned SRModel as a pyfunc, and load one back.

What is stored (no pickle anywhere):

- `artifacts/model.pt`: the model file of the project, `{"spec": SRModel.spec, "state_dict": ...}`
  (`c2disr.evaluate.save_model`), read back with `torch.load(..., weights_only=True)` and
  `build_from_spec` (`c2disr.evaluate.load_model`).
- `sr_pyfunc.py`: a three-line "models from code" entry point that imports
  `srplatform.mlmodel.SRPyfuncModel` by module path and hands an instance to
  `mlflow.models.set_model`. MLflow then writes no `python_model.pkl`: the class is found by
  import, so loading needs this project installed (it is in the platform image; the model's
  requirements say so) and never unpickles code.
- `MLmodel` metadata: `c2disr_spec` (the spec) and `c2disr_format`, plus the caller's metadata.

The pyfunc contract (`mlflow.pyfunc.load_model(uri).predict(x, params=...)`):

- input: `float32` numpy array `(N, 3, h, w)`, RGB in [0, 1] (channels first, as the models);
- output: `float32` numpy array `(N, 3, H, W)`, RGB clamped to [0, 1]; discrete models give
  `H = h * scale`; continuous models give `H = round(h * scale)` for the `scale` param;
- params (all optional): `scale` (float; must equal the model's scale for a discrete model,
  any value > 0 for a continuous one, default: the spec's scale), `tile` (int, LR tile size
  for tiled inference, 0 = whole image, the default), `overlap` (int, LR pixels, default 16).

`load_sr_model(uri)` skips the pyfunc wrapper (no code is run, no environment is checked): it
fetches the model directory (the model file and a few small text files), reads the model file and
returns the `SRModel` (CPU, eval mode), for `runs:/RUN/model`, `models:/NAME@alias`,
`models:/NAME/VERSION`, `models:/m-<id>`, a local MLflow model directory, or a local model file.
It is the one place in the project that resolves those URIs. The tracking server is
`tracking_uri`, else `$MLFLOW_TRACKING_URI`, else the running local stack
(`srplatform.evaluation.model_tracking_uri`; no server is started).

mlflow and torch are imported inside functions; `SRPyfuncModel` is created on first access
(PEP 562 module `__getattr__`), so importing this module stays cheap.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from srplatform.errors import UserError

__all__ = ["log_sr_model", "load_sr_model", "SRPyfuncModel", "MODEL_FILE_KEY", "MODEL_FILE_NAME"]

MODEL_FILE_KEY = "model_file"  # the key in `artifacts=` and in the pyfunc context
MODEL_FILE_NAME = "model.pt"
FORMAT = "c2disr-model-file/1"  # {"spec", "state_dict"}, weights_only-loadable

# The models-from-code entry point written next to every logged model. It must stay importable
# without side effects beyond set_model; MLflow executes it when logging and when loading.
_CODE_FILE = "sr_pyfunc.py"
_CODE_TEXT = '''"""c2disr SR model entry point (MLflow models from code); the class lives in srplatform.mlmodel."""
import mlflow
from srplatform.mlmodel import SRPyfuncModel

mlflow.models.set_model(SRPyfuncModel())
'''

_URI_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:", "s3://", "gs://", "http://", "https://",
                "dbfs:/", "wasbs://", "abfss://")


# ----------------------------------------------------------------------------- the pyfunc class


def _make_pyfunc_class():
    import mlflow.pyfunc

    class SRPyfuncModel(mlflow.pyfunc.PythonModel):
        """MLflow pyfunc around an SRModel; see the module docstring for the predict contract."""

        # The numpy-in/numpy-out contract is enforced by the TensorSpec signature logged with
        # the model; type-hint based conversion would get in its way.
        _skip_type_hint_validation = True

        def load_context(self, context) -> None:
            import torch

            from c2disr.evaluate import load_model

            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self.model = load_model(context.artifacts[MODEL_FILE_KEY]).to(self.device).eval()

        def predict(self, context, model_input, params: dict[str, Any] | None = None):
            import numpy as np
            import torch

            from srplatform.upscale import sr_forward

            x = np.asarray(model_input)
            if x.ndim != 4 or x.shape[1] != 3:
                raise ValueError(
                    f"expected a float32 array (N, 3, h, w) of RGB in [0, 1], got shape {x.shape}"
                )
            params = dict(params or {})
            scale = params.get("scale")
            tile = int(params.get("tile") or 0)
            overlap = int(params.get("overlap", 16))
            lr = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            with torch.inference_mode():
                sr = sr_forward(self.model, lr, scale=scale, tile=tile or None, overlap=overlap)
                return sr.clamp(0.0, 1.0).cpu().numpy().astype(np.float32, copy=False)

    SRPyfuncModel.__module__ = __name__
    SRPyfuncModel.__qualname__ = "SRPyfuncModel"
    return SRPyfuncModel


def __getattr__(name: str):
    if name == "SRPyfuncModel":
        cls = _make_pyfunc_class()
        globals()["SRPyfuncModel"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- logging


def _signature(spec: Mapping[str, Any]):
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),
        params=ParamSchema([
            ParamSpec("scale", "double", float(spec.get("scale") or 4)),
            ParamSpec("tile", "long", 0),
            ParamSpec("overlap", "long", 16),
        ]),
    )


def _requirements() -> list[str]:
    """Pinned to what is running: spares MLflow its slow requirement inference (a subprocess
    that loads the model) and states that the c2disr project itself must be installed."""
    import mlflow
    import numpy
    import torch

    from srplatform import __version__

    torch_version = torch.__version__.split("+")[0]
    return [f"mlflow=={mlflow.__version__}", f"torch=={torch_version}",
            f"numpy=={numpy.__version__}", f"c2disr=={__version__}"]


def log_sr_model(model, *, name: str = "model", input_example=None, metadata: Mapping[str, Any] | None = None):
    """Log `model` (an SRModel) as an MLflow pyfunc model named `name` in the active run.

    `input_example`: optional float32 array `(N, 3, h, w)` in [0, 1] (keep it small: it is stored
    as JSON and MLflow runs the model on it once to check it). `metadata`: extra JSON-able
    entries for the MLmodel file. Returns MLflow's `ModelInfo` (`model_uri` is
    `models:/m-...`, `runs:/RUN/NAME` also works). Raises RuntimeError without an active run.
    """
    import mlflow

    from c2disr.evaluate import save_model

    if mlflow.active_run() is None:
        raise RuntimeError("log_sr_model needs an active MLflow run (inside mlflow.start_run())")
    spec = getattr(model, "spec", None)
    if not isinstance(spec, Mapping):
        raise TypeError(f"log_sr_model expects an SRModel (with .spec), got {type(model).__name__}")
    meta = {"c2disr_format": FORMAT, "c2disr_spec": dict(spec)}
    meta.update(dict(metadata or {}))
    with tempfile.TemporaryDirectory(prefix="c2d-mlmodel-") as tmp, warnings.catch_warnings():
        # The signature is explicit, so MLflow's advice to add an input example is noise here.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        model_file = Path(tmp) / MODEL_FILE_NAME
        save_model(model_file, model)
        code_file = Path(tmp) / _CODE_FILE
        code_file.write_text(_CODE_TEXT)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(code_file),
            artifacts={MODEL_FILE_KEY: str(model_file)},
            signature=_signature(spec),
            input_example=input_example,
            metadata=meta,
            pip_requirements=_requirements(),
        )


# ----------------------------------------------------------------------------- loading


def _is_uri(text: str) -> bool:
    return text.startswith(_URI_SCHEMES)


def _model_file_relpath(mlmodel_path: Path, where: str) -> str:
    """The model file's path inside an MLflow model directory, from its MLmodel file."""
    import yaml

    try:
        doc = yaml.safe_load(mlmodel_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{where}: cannot read its MLmodel file ({exc})") from exc
    pyfunc = (doc.get("flavors") or {}).get("python_function") or {}
    entry = (pyfunc.get("artifacts") or {}).get(MODEL_FILE_KEY) or {}
    rel = entry.get("path")
    if not rel:
        raise UserError(
            f"{where} is an MLflow model but not a c2disr SR model (no '{MODEL_FILE_KEY}' "
            "artifact); log it with srplatform.mlmodel.log_sr_model"
        )
    return rel


def _download(uri: str, tracking_uri: str, dst: str) -> Path:
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from srplatform.tracking import mlflow_server, redact_uri

    server = redact_uri(tracking_uri)  # for messages: never print credentials in a URI
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # c2d prints its own
    try:
        # The URIs are given twice: MLflow resolves `models:/` from its globals, not from the
        # arguments (see `mlflow_server`).
        with mlflow_server(tracking_uri):
            return Path(mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=dst, tracking_uri=tracking_uri, registry_uri=tracking_uri))
    except MlflowException as exc:
        raise UserError(f"cannot fetch {uri} from {server}: {exc.message}") from exc
    except OSError as exc:  # connection refused, missing file in the artifact store
        raise UserError(f"cannot fetch {uri} from {server}: {exc}") from exc


def resolve_model_file(uri: str, dst: str, *, tracking_uri: str | None = None) -> Path:
    """The local path of the model file behind `uri` (downloaded into `dst` when remote)."""
    uri = str(uri)
    if uri.startswith("file://"):
        from urllib.parse import unquote, urlparse

        uri = unquote(urlparse(uri).path)
    if not _is_uri(uri):
        path = Path(uri).expanduser()
        if path.is_dir():
            if not (path / "MLmodel").is_file():
                raise UserError(f"{path} is a directory but not an MLflow model (no MLmodel file)")
            return path / _model_file_relpath(path / "MLmodel", str(path))
        if path.is_file():
            return path
        raise UserError(
            f"model {uri!r} not found: give a model file, an MLflow model directory, "
            "runs:/RUN_ID/model, models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    from srplatform.evaluation import model_tracking_uri

    # The whole model directory is fetched (MLmodel, the model file and a few small text
    # files): `models:/m-<id>` URIs of logged models accept no sub-path, and the MLmodel file
    # says where the model file is.
    local = _download(uri.rstrip("/"), model_tracking_uri(tracking_uri), dst)
    if not (local / "MLmodel").is_file():
        raise UserError(f"{uri} is not an MLflow model (no MLmodel file); give the model's URI")
    return local / _model_file_relpath(local / "MLmodel", uri)


def load_sr_model(uri: str | os.PathLike, *, tracking_uri: str | None = None):
    """The SRModel behind `uri` (see the module docstring), on the CPU, in eval mode.

    Bad or unknown URIs, missing aliases/versions, unreachable servers and non-c2disr models
    raise `UserError` naming the URI.
    """
    from c2disr.evaluate import load_model

    with tempfile.TemporaryDirectory(prefix="c2d-load-") as tmp:
        path = resolve_model_file(str(uri), tmp, tracking_uri=tracking_uri)
        try:
            model = load_model(path)
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{uri}: not a loadable c2disr model file ({exc})") from exc
    return model.eval()
