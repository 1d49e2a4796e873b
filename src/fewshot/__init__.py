"""fewshot: meta-learning for few-shot visual recognition.

Every method is a mapping-maker: it turns a support set into a predictor.
"""

from fewshot.errors import FewShotError

__all__ = ["FewShotError", "__version__"]
__version__ = "0.1.0"
