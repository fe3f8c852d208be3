"""stepwise: long-tailed object detection on Deformable DETR.

Step-wise learning on smooth-tail data, BAGS / hybrid BAGS grouped classifiers, the BACL loss, and the
official LVIS metrics, trained with Hugging Face Accelerate.
"""

__version__ = "0.1.0"
