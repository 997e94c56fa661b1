"""MLflow "model from code": a promoted adapter as a pyfunc that classifies images.

Input: a DataFrame with a column `image` holding file paths or base64-encoded image bytes.
Output: one row per image with the top class, its probability and the top-k classes.
"""
import base64
import binascii
import os

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


def _decode(value):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if os.path.exists(value):
        return value
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"image {value[:80]!r} is neither an existing file nor base64 image bytes") from None


class ClipAdapterModel(PythonModel):
    # The signature is given explicitly when the model is logged; type-hint validation would
    # only warn on every load.
    _skip_type_hint_validation = True

    def load_context(self, context):
        from clip_adapter import AdapterClassifier

        self.classifier = AdapterClassifier(context.artifacts["adapter"])

    def predict(self, context, model_input, params=None):
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise ValueError("input needs a column 'image' (file path or base64 bytes)")
        top_k = int((params or {}).get("top_k", 3))
        preds = self.classifier.predict([_decode(v) for v in frame["image"]], top_k)
        return pd.DataFrame({
            "label": [p[0][0] for p in preds],
            "score": [p[0][1] for p in preds],
            "top_labels": [[c for c, _ in p] for p in preds],
            "top_scores": [[s for _, s in p] for p in preds],
        })


mlflow.models.set_model(ClipAdapterModel())
