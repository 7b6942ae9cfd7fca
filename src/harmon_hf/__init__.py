"""harmon-hf: Harmon (unified image understanding + generation) for transformers and diffusers.

Importing the package imports every component module eagerly and registers the classes with the transformers Auto
classes: diffusers finds out-of-tree pipeline components only in modules that are already imported, so
`HarmonPipeline.from_pretrained(folder)` works in a fresh interpreter that imports only `harmon_hf`.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_harmon import HarmonConfig, HarmonDiffusionHeadConfig, HarmonMARConfig, HarmonVAEConfig
from .image_processing_harmon import HarmonImageProcessor
from .lora import LORA_PRESETS, get_harmon_peft_model, harmon_lora_config, lora_preset_names
from .modeling_harmon import HarmonForConditionalGeneration, HarmonModel, HarmonPreTrainedModel
from .pipeline_harmon import HarmonPipeline
from .processing_harmon import HarmonProcessor
from .scheduling_harmon import HarmonDDPMScheduler

__version__ = "0.1.0"

AutoConfig.register("harmon", HarmonConfig, exist_ok=True)
AutoModel.register(HarmonConfig, HarmonModel, exist_ok=True)
AutoModelForImageTextToText.register(HarmonConfig, HarmonForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(HarmonConfig, image_processor_classes={"pil": HarmonImageProcessor}, exist_ok=True)
AutoProcessor.register(HarmonConfig, HarmonProcessor, exist_ok=True)

__all__ = [
    "HarmonConfig",
    "HarmonDDPMScheduler",
    "HarmonDiffusionHeadConfig",
    "HarmonForConditionalGeneration",
    "HarmonImageProcessor",
    "HarmonMARConfig",
    "HarmonModel",
    "HarmonPipeline",
    "HarmonPreTrainedModel",
    "HarmonProcessor",
    "HarmonVAEConfig",
    "LORA_PRESETS",
    "get_harmon_peft_model",
    "harmon_lora_config",
    "lora_preset_names",
]
