"""ca-flow's library: CLIP-Adapter on cached CLIP features. Knows nothing of Ray or MLflow.

Names load on first use, so `clip_adapter.datasets` (listing folders, validating names) never
pays for importing torch.
"""

from importlib import import_module

_PUBLIC = {
    "CLIPAdapter": "adapter",
    "zero_shot_logits": "adapter",
    "AdapterClassifier": "artifact",
    "AdapterMeta": "artifact",
    "load_adapter": "artifact",
    "save_adapter": "artifact",
    "Backbone": "backbone",
    "BackboneError": "backbone",
    "load_backbone": "backbone",
    "DatasetError": "datasets",
    "DatasetSplits": "datasets",
    "few_shot": "datasets",
    "LocalEncoder": "encoding",
    "zero_shot_accuracy": "encoding",
    "FeatureStore": "features",
    "METHODS": "methods",
    "FewShot": "methods",
    "Method": "methods",
    "make": "methods",
    "TrainConfig": "train",
    "epochs_for_shots": "train",
    "evaluate": "train",
    "fit": "train",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'clip_adapter' has no attribute {name!r}")
    return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
