"""``c2vkd export RUN_DIR``: the trained student of a run as deployable files, each one verified.

What is read: ``RUN_DIR/config.yaml`` (the resolved config the trainer wrote) and a c2vkd training checkpoint
(``--checkpoint``, else the latest ``checkpoints/iter_*.pt`` whose checksum verifies), always through
``safe_load`` (``weights_only=True``). Only ``checkpoint["student"]`` is used: the teacher is never in a
checkpoint, and the loss modules' alignment heads (``loss_heads``), the optimizer and the RNG state are left
behind. A ``c2vkd-student-v1`` safetensors file is accepted as ``--checkpoint`` too.

What is written to ``out_dir`` (default ``RUN_DIR/export``):

=============  =============================  =====================================================
format         file                           verified by
=============  =============================  =====================================================
safetensors    ``student.safetensors``         rebuilt with ``c2vkd.engine.weights.build_for_eval``
torchscript    ``student.torchscript.pt``      ``torch.jit.load``
onnx           ``student.onnx``                ``onnx.checker``, then onnxruntime if installed, else
                                               ``onnx.reference.ReferenceEvaluator`` (pure numpy)
hf             ``hf/`` (a folder)              SegFormer students: ``transformers``' own
                                               ``SegformerForSemanticSegmentation.from_pretrained`` and
                                               ``SegformerImageProcessor.from_pretrained`` (offline),
                                               and c2vkd's HF loader; other students: c2vkd's loader and,
                                               for a timm encoder, ``timm.create_model`` + strict load
=============  =============================  =====================================================

plus ``export.json`` (model, classes, input shape, normalisation, sha256 and verification of every file).
The default input size is the run's *evaluation* size (:func:`run_eval_size`): ``data.eval_transform.size``
when set, else the size of the first image of the evaluation split.

HF folder (``--format hf``), SegFormer students: ``config.json`` + ``model.safetensors`` written by
transformers' ``save_pretrained`` (our SegFormer's parameter names *are* transformers' own, so the student's
state dict loads into ``SegformerForSemanticSegmentation`` strictly, with no key mapping; transformers writes
its on-disk names itself and c2vkd reads them back through the one HF mapping in
``c2vkd.models.segformer`` - the export checks that round trip too), ``preprocessor_config.json``
(``SegformerImageProcessor``: each image kept at its own size unless ``data.eval_transform`` is ``resize``,
then resized to ``eval_transform.size`` as c2vkd evaluates; the run's mean/std, no label reduction; checked
against c2vkd's evaluation transform on an image of another size),
``id2label``/``label2id`` from the dataset's classes, and a model card ``README.md`` (teacher, method, data,
schedule, how it was evaluated, test mIoU and per-class IoU from ``eval_test.json`` when present, a
transformers snippet that gives `c2vkd predict`'s mask at any image size, or names what of `c2vkd predict` it
cannot reproduce, the commands). transformers' SegFormer returns logits at 1/4 of the input: the
verification compares them with the student's decode-head output (the same 1/4 tensor, before c2vkd's
upsampling), and their bilinear upsampling (``align_corners=False``, as c2vkd does) with the student's
full-size logits. Other students: the same card,
``model.safetensors`` (c2vkd student format: ``c2vkd eval/predict --checkpoint``, ``build_model(NAME, K,
pretrained=FOLDER)``), ``config.json``, and for timm encoders ``encoder/model.safetensors`` +
``encoder/config.json`` that ``timm.create_model(ARCH, num_classes=0)`` loads strictly.

``--dynamic`` (ONNX): batch, height and width are dynamic axes. The graph is traced once and then checked at
two different input sizes (and batch 2 at the second), against the student run in torch.
Each file is reloaded after writing and its logits on a random input are compared with the student built
from the checkpoint (max abs difference <= ``atol``, default 1e-4); a larger difference raises
:class:`ExportError` and the file is removed.

TorchScript and ONNX are *traced* (``torch.jit.trace``; the legacy TorchScript-based ONNX exporter,
``dynamo=False``: the torch.export-based one needs ``onnxscript``, which c2vkd does not require) at one fixed
input shape ``[1, 3, H, W]`` (``input_hw``). Shape-dependent Python in the models (padding amounts,
interpolation sizes, positional-embedding resampling) is frozen at that size, so feed the exported graphs
exactly that shape (unless the ONNX graph was exported with ``dynamic=True`` and verified at two sizes);
the safetensors export has no such restriction. Inputs are normalised images
(``mean``/``std`` in export.json), outputs logits ``[1, K, H, W]``. (torch marks ``torch.jit`` deprecated
in favour of ``torch.export``; its warnings are silenced here because every traced file is verified.)
"""
from c2vkd.runners.export.hf import model_card, preset_for_losses
from c2vkd.runners.export.run import (FILE_NAMES, FORMATS, export_run, find_checkpoint, format_manifest,
                                      load_run_student, run_eval_size)
from c2vkd.runners.export.verify import ExportError

__all__ = ["FILE_NAMES", "FORMATS", "ExportError", "export_run", "find_checkpoint", "format_manifest",
           "load_run_student", "model_card", "preset_for_losses", "run_eval_size"]
