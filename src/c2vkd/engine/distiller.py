"""The Distiller: student + configured losses (with their alignment heads) + an optional frozen teacher.

Supervised training is the special case with no teacher and only the ``ce`` loss, so train, distill and
compare share this one module and the one loop in trainer.py.

The teacher is held outside the module tree (not a submodule): it never appears in ``parameters()``,
``state_dict()`` or the optimizer, and DDP never sees it. It runs in eval mode under ``torch.no_grad()``.
Feature taps are forward hooks (models.FeatureTaps); no model is edited to distil it.

With a teacher cache (``teacher.cache``, engine/teacher_cache/) there is no teacher at all: the batch carries
the cached outputs of its views, which ``forward`` decodes in place of a teacher forward.
"""
from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

import torch
from torch import nn

from c2vkd.engine.loss_config import loss_args, loss_label, teacher_losses, term_suffix
from c2vkd.losses import LOSSES, DistillLoss, LossContext, LossInputs
from c2vkd.models import FeatureTaps, probe_shapes

log = logging.getLogger("c2vkd")


def loss_tap_names(loss_cfgs: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Union (in order) of the student and teacher taps every configured loss reads."""
    s_names: list[str] = []
    t_names: list[str] = []
    for entry in loss_cfgs:
        cls = LOSSES.get(entry["name"])
        s, t = cls.taps(loss_args(entry))
        s_names += [n for n in s if n not in s_names]
        t_names += [n for n in t if n not in t_names]
    return s_names, t_names


class Distiller(nn.Module):
    def __init__(self, student: nn.Module, loss_cfgs: list[dict[str, Any]], *, num_classes: int,
                 ignore_index: int, teacher: nn.Module | None = None,
                 probe_hw: tuple[int, int] = (512, 512), teacher_cache: Any = None,
                 teacher_autocast: Callable[[], AbstractContextManager] | None = None) -> None:
        """``teacher_autocast``: a factory of the context the live teacher's forward runs in (``teacher.amp``,
        utils/device.teacher_autocast); None runs it in the caller's context, like the student."""
        super().__init__()
        self.teacher_autocast = teacher_autocast
        self.student = student
        self.num_classes = num_classes
        needs_teacher = teacher_losses(loss_cfgs)
        if teacher is not None and teacher_cache is not None:
            raise ValueError("give the Distiller a teacher or a teacher cache, not both")
        if needs_teacher and teacher is None and teacher_cache is None:
            raise ValueError(f"losses {needs_teacher} need a teacher, but teacher.name is not set in the config")
        if teacher is not None and not needs_teacher:
            log.warning("a teacher is configured but no loss uses it: it will not be run")
            teacher = None
        if teacher_cache is not None and not needs_teacher:
            log.warning("teacher.cache is set but no loss uses a teacher: it will not be read")
            teacher_cache = None
        # TeacherCache (engine/teacher_cache/store.py) standing in for the teacher: decodes the batch's cached outputs
        self.__dict__["teacher_cache"] = teacher_cache
        # plain attribute, not a submodule: never trained, never saved, never wrapped by DDP
        self.__dict__["teacher"] = teacher
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

        s_names, t_names = loss_tap_names(loss_cfgs)
        self.student_taps = FeatureTaps(student, s_names) if s_names else None
        self.__dict__["teacher_taps"] = FeatureTaps(teacher, t_names) if (t_names and teacher is not None) else None
        self.teacher_tap_names = t_names
        # Adapters are sized from a dummy forward at the training crop size, never from hard-coded channels.
        s_shapes = probe_shapes(student, s_names, probe_hw) if s_names else {}
        t_shapes = probe_shapes(teacher, t_names, probe_hw) if (t_names and teacher is not None) else {}
        if teacher_cache is not None:
            t_shapes = teacher_cache.tap_shapes(t_names, probe_hw)  # also checks the cache's crop size
        ctx = LossContext(num_classes=num_classes, ignore_index=ignore_index, student_shapes=s_shapes,
                          teacher_shapes=t_shapes, input_size=probe_hw)
        modules: list[DistillLoss] = []
        for entry in loss_cfgs:
            modules.append(LOSSES.get(entry["name"])(ctx, **loss_args(entry)))
        self.losses = nn.ModuleList(modules)
        # a module's own term names (its ``weights`` keys, which it may read itself) + its entry's tag suffix =
        # the run's term names (logs, balance targets, gradient shares)
        self.term_suffixes = [term_suffix(e) for e in loss_cfgs]
        self.loss_labels = [loss_label(e) for e in loss_cfgs]
        names = [name for name, _, _ in self._public_terms()]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"loss terms {sorted(dup)} are configured twice; give each loss once, or tell two "
                             f"entries of one loss apart with `tag:` (their terms become <term>_<tag>)")
        # train.compile: compiled callables standing in for the student / loss modules in forward (plain
        # attributes: the modules themselves stay the unwrapped ones in the tree, state dicts and DDP)
        self.__dict__["compiled_student"] = None
        self.__dict__["compiled_losses"] = None

    def use_compiled(self, student: Callable | None = None, losses: list[Callable] | None = None) -> None:
        """Run ``forward`` through compiled stand-ins of the student and / or the loss modules (each sharing
        the module's parameters and hooks; engine/runtime.compiled). None: the eager module."""
        if losses is not None and len(losses) != len(self.losses):
            raise ValueError(f"use_compiled: {len(losses)} compiled losses for {len(self.losses)} loss modules")
        self.__dict__["compiled_student"] = student
        self.__dict__["compiled_losses"] = losses

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher stays in eval mode (frozen BN statistics) whatever we do
        return self

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.losses.parameters() if p.requires_grad]

    # Live term weights: each loss module's ``weights`` dict is read at every forward, so the balancer
    # (engine/balance.py) changes a term's weight by writing it here.
    def _public_terms(self):
        """(run term name, module, module's own term name) for every term, in config order."""
        for m, sfx in zip(self.losses, self.term_suffixes):
            for t in m.weights:
                yield f"{t}{sfx}", m, t

    def term_weights(self) -> dict[str, float]:
        return {name: float(m.weights[t]) for name, m, t in self._public_terms()}

    def set_term_weights(self, weights: dict[str, float]) -> None:
        for name, m, t in list(self._public_terms()):
            if name in weights:
                m.weights[t] = float(weights[name])

    def pop_graph_terms(self) -> dict[str, torch.Tensor]:
        """The raw, graph-attached terms of the last forward made with ``record_graph_terms = True`` (for
        per-term gradient measurement); non-zero-weight terms only. Cleared by the call."""
        terms = self.__dict__.pop("_graph_terms", None)
        if terms is None:
            raise RuntimeError("pop_graph_terms: the last forward did not record terms (set record_graph_terms)")
        return terms

    def forward(self, images: torch.Tensor, target: torch.Tensor, cached_teacher: dict[str, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Returns (weighted total loss, {term: raw value, term/w: weighted value}, student logits).

        ``cached_teacher``: the batch's compact cached teacher outputs (``batch["teacher"]``), required when
        the Distiller was built with a teacher cache and ignored otherwise."""
        s_logits = (self.student if self.compiled_student is None else self.compiled_student)(images)
        s_feats = self.student_taps.pop() if self.student_taps is not None else {}
        t_logits = None
        t_feats: dict[str, torch.Tensor] = {}
        if self.teacher is not None:
            with torch.no_grad():
                with self.teacher_autocast() if self.teacher_autocast is not None else nullcontext():
                    t_logits = self.teacher(images)
                if self.teacher_taps is not None:
                    t_feats = self.teacher_taps.pop()
                if self.teacher_autocast is not None:  # teacher.amp: back in the student's dtype for the losses
                    t_logits = t_logits.to(s_logits.dtype)
                    t_feats = {k: v.to(s_logits.dtype) if torch.is_floating_point(v) else v
                               for k, v in t_feats.items()}
        elif self.teacher_cache is not None:
            if cached_teacher is None:
                raise RuntimeError("teacher.cache is set but the batch carries no cached teacher outputs "
                                   "(the training dataset must be wrapped in CachedTeacherDataset)")
            with torch.no_grad():
                t_logits, t_feats = self.teacher_cache.decode(cached_teacher, images.shape[-2:],
                                                              self.teacher_tap_names, dtype=s_logits.dtype)
        inputs = LossInputs(student_logits=s_logits, target=target, teacher_logits=t_logits,
                            student_feats=s_feats, teacher_feats=t_feats)
        total = s_logits.new_zeros((), dtype=torch.float32)
        terms: dict[str, torch.Tensor] = {}
        graph_terms: dict[str, torch.Tensor] = {}
        calls = list(self.losses) if self.compiled_losses is None else self.compiled_losses
        for module, call, sfx in zip(self.losses, calls, self.term_suffixes):
            for own, raw in call(inputs).items():
                w, name = module.weights[own], f"{own}{sfx}"
                raw = raw.float()
                terms[name] = raw.detach()
                terms[f"{name}/w"] = (raw * w).detach()
                if w != 0:  # weight 0 is "compute and log only" (the released code's CE)
                    total = total + w * raw
                    graph_terms[name] = raw
        if getattr(self, "record_graph_terms", False):
            self.__dict__["_graph_terms"] = graph_terms
        return total, terms, s_logits
