"""c2vkd: distil CNN segmentation teachers into compact vision transformers (C2VKD and baselines)."""
__version__ = "0.1.0"
IGNORE_INDEX = 255  # every dataset loader maps its own void/ignore value to this
