"""The import path of FusedLoraLinear before the layers/ package (lora_kernels.layers.dense): kept as a re-export."""
from .layers import (DEFAULT_ADAPTER, AdapterSpec, FusedLoraLinear, check_adapter_name,  # noqa: F401
                     is_bnb_quantized, is_conv1d, linear_features, linear_sharing)
