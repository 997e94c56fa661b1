"""MLflow "model from code": a promoted adapter as a pyfunc that classifies images.

Input: a column `image` of base64-encoded image bytes (raw bytes too). File paths are read only when
the model was loaded with `model_config={"image_root": DIR}` and only under DIR, so a server never
opens a path a client names. Output per image: the top class, its probability, the top_k classes.
Bad input raises MlflowException(INVALID_PARAMETER_VALUE): a server's 400 says the cause in one line.
"""

import base64
import binascii
from pathlib import Path

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

import mlflow


def bad_input(message):
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class ClipAdapterModel(PythonModel):
    # The signature is given explicitly when the model is logged; type-hint validation would
    # only warn on every load.
    _skip_type_hint_validation = True

    def load_context(self, context):
        from clip_adapter import AdapterClassifier

        self.classifier = AdapterClassifier(context.artifacts["adapter"])
        root = (context.model_config or {}).get("image_root")
        self.image_root = Path(root).resolve() if root else None

    def _image(self, row, value):
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if not isinstance(value, str) or not value:
            raise bad_input(
                f"row {row}: 'image' must be base64-encoded image bytes, got {type(value).__name__}"
            )
        if self.image_root is not None and len(value) < 4096:
            path = Path(value).resolve()
            if path.is_file():
                if not path.is_relative_to(self.image_root):
                    raise bad_input(f"row {row}: {value} is outside the allowed image root {self.image_root}")
                return path.read_bytes()
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise bad_input(
                f"row {row}: 'image' is not base64-encoded image bytes (file paths are not "
                f"accepted by a served model; send the file's bytes, base64-encoded)"
            ) from None

    def predict(self, context, model_input, params=None):
        from clip_adapter.images import ImageError, decode

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise bad_input("input needs a column 'image' of base64-encoded image bytes")
        top_k = (params or {}).get("top_k", 3)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise bad_input(f"top_k must be an integer >= 1, got {top_k!r}")
        images = []
        for row, value in enumerate(frame["image"]):
            try:
                images.append(decode(self._image(row, value)))
            except ImageError as exc:
                raise bad_input(f"row {row}: {exc}") from None
        preds = self.classifier.predict(images, top_k)
        return pd.DataFrame(
            {
                "label": [p[0][0] for p in preds],
                "score": [p[0][1] for p in preds],
                "top_labels": [[c for c, _ in p] for p in preds],
                "top_scores": [[s for _, s in p] for p in preds],
            }
        )


mlflow.models.set_model(ClipAdapterModel())
