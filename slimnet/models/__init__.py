"""Model zoo. Importing the model files runs their ``@register_model`` decorators.

    from slimnet.models import create_model, list_models, model_metadata
    model = create_model("vgg_small", num_classes=10, in_channels=1)
"""

from slimnet.models import cifar_resnet, torchvision_adapter, vgg  # noqa: F401  (registration side effects)
from slimnet.models.registry import create_model, list_models, model_metadata, register_model

__all__ = ["create_model", "list_models", "model_metadata", "register_model"]
