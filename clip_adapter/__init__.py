"""ca-flow's library: CLIP-Adapter on cached CLIP features. Knows nothing of Ray or MLflow."""
from .adapter import CLIPAdapter, zero_shot_logits
from .artifact import AdapterClassifier, AdapterMeta, load_adapter, save_adapter
from .backbone import Backbone, BackboneError, load_backbone
from .datasets import DatasetError, Split, few_shot
from .features import FeatureCache, LocalEncoder
from .methods import METHODS, FewShot, Method, make
from .train import TrainConfig, epochs_for_shots, evaluate, fit, zero_shot_accuracy

__all__ = [
    "AdapterClassifier", "AdapterMeta", "Backbone", "BackboneError", "CLIPAdapter", "DatasetError",
    "FeatureCache", "FewShot", "LocalEncoder", "METHODS", "Method", "make", "Split", "TrainConfig", "epochs_for_shots", "evaluate",
    "few_shot", "fit", "load_adapter", "load_backbone", "save_adapter", "zero_shot_accuracy",
    "zero_shot_logits",
]
