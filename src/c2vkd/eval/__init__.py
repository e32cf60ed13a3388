"""Evaluation: confusion-matrix metrics (``metrics``) and test-time inference plus the evaluation loop over a
loader (``inference``: whole / sliding-window / centre-crop, multi-scale + flip, :func:`evaluate`).

A sibling of ``data``, ``models`` and ``losses``: it imports only the base layer (``utils``), works on any
``nn.Module`` and any iterable of ``{"image", "label"}`` batches, and knows nothing about configs, datasets or
checkpoints; ``engine/evaluation.py`` wires it to a config.
"""
from c2vkd.eval.inference import MODES, center_crop_box, crop_labels_like, evaluate, predict_logits, slide_windows
from c2vkd.eval.metrics import ConfusionMatrix, SegMetrics, format_table

__all__ = ["MODES", "ConfusionMatrix", "SegMetrics", "center_crop_box", "crop_labels_like", "evaluate",
           "format_table", "predict_logits", "slide_windows"]
