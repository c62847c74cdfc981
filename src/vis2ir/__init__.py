"""vis2ir: visible-to-infrared image generation on FLUX.1 Fill with semantic conditioning."""

from vis2ir.errors import Vis2IRError

__all__ = ["Vis2IRError"]
__version__ = "0.1.0"
