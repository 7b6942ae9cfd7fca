"""harmon-hf: Harmon for transformers and diffusers."""

from .configuration_harmon import HarmonConfig, HarmonDiffusionHeadConfig, HarmonMARConfig, HarmonVAEConfig

__version__ = "0.1.0"

__all__ = ["HarmonConfig", "HarmonDiffusionHeadConfig", "HarmonMARConfig", "HarmonVAEConfig"]
