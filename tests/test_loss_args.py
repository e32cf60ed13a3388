"""Every numeric / boolean option of the C2VKD, supervised and KD losses reaches the computation (generic wiring).

For each built-in loss and each constructor option with a number or bool default, the module is built twice
(same seed, so alignment heads start identical), once with the default and once with another value, and run on
the same inputs: the weighted total or the student's gradient must change. A dropped option (the module
passing its default, or nothing, to the pure function) fails here. Options that must NOT change the result
(chunk sizes, memory-saving paths, DDP-only switches) are checked the other way round: same value and gradient.
The exact maths of each loss is tested against references in its own test file; the other baselines' options
are covered in tests/test_baselines_*.py.
"""
from __future__ import annotations

import inspect

import pytest
import torch

from c2vkd.losses import LOSSES, LossContext, LossInputs

BUILTIN = ["ce", "pdd", "vlfd", "kd"]

#: value used instead of the default where the generic rule (x1.7 + 0.3 for floats, +1 for ints, not for bools)
#: does not fit: pdd's options default to None (the preset), graph_eps = 1e-8 is too small to show.
OTHER_VALUE = {
    ("pdd", "alpha"): 0.9, ("pdd", "beta"): 0.1, ("pdd", "temperature"): 2.0, ("pdd", "gt_mix"): 0.2,
    ("pdd", "use_nckd"): False, ("vlfd", "graph_eps"): 10.0,
}
#: options that must leave value and gradient unchanged (memory / chunking / multi-process only), with the value
SAME_RESULT = {
    ("pdd", "memory_efficient"): False, ("vlfd", "graph_across_ranks"): True,
}
#: options this generic check cannot exercise, and why
SKIP = {
    ("vlfd", "allow_torchscript"): "only affects loading a CLIP checkpoint file",
}

CTX = dict(num_classes=5, student_shapes={"feat": (2, 16, 4, 5)}, teacher_shapes={"feat": (2, 32, 8, 10)})


def _options() -> list[tuple[str, str, object, str]]:
    out = []
    for name in BUILTIN:
        sig = inspect.signature(LOSSES.get(name).__init__)
        for p in sig.parameters.values():
            if p.name in ("self", "ctx", "weight") or (name, p.name) in SKIP:
                continue
            d = p.default
            if (name, p.name) in SAME_RESULT:
                out.append((name, p.name, SAME_RESULT[(name, p.name)], "same"))
            elif (name, p.name) in OTHER_VALUE:
                out.append((name, p.name, OTHER_VALUE[(name, p.name)], "differs"))
            elif isinstance(d, bool):
                out.append((name, p.name, not d, "differs"))
            elif isinstance(d, int):
                out.append((name, p.name, d + 1, "differs"))
            elif isinstance(d, float):
                out.append((name, p.name, d * 1.7 + 0.3, "differs"))
    return out


def _inputs() -> LossInputs:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (2, 8, 10), generator=g)
    target[0, :2] = 255
    return LossInputs(student_logits=(torch.randn(2, 5, 8, 10, generator=g) * 2).requires_grad_(True),
                      target=target, teacher_logits=torch.randn(2, 5, 8, 10, generator=g) * 2,
                      student_feats={"feat": torch.randn(2, 16, 4, 5, generator=g).requires_grad_(True)},
                      teacher_feats={"feat": torch.randn(2, 32, 8, 10, generator=g).relu()})


def _run(name: str, **kw) -> tuple[float, torch.Tensor]:
    torch.manual_seed(0)
    mod = LOSSES.get(name)(LossContext(**CTX), **kw)
    mod.train()
    inp = _inputs()
    out = mod(inp)
    total = sum(mod.weights[k] * v for k, v in out.items())
    leaves = [inp.student_logits, inp.student_feats["feat"]]
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(x)).reshape(-1) for g, x in zip(grads, leaves)])
    return float(total), flat


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name,option,value,expect", _options(), ids=lambda v: str(v))
def test_option_reaches_the_computation(name, option, value, expect):
    base_v, base_g = _run(name)
    v, g = _run(name, **{option: value})
    assert torch.isfinite(torch.tensor(v)) and torch.isfinite(g).all()
    scale = max(abs(base_v), 1e-12)
    if expect == "same":
        assert v == pytest.approx(base_v, rel=1e-5, abs=1e-9), (name, option)
        torch.testing.assert_close(g, base_g, rtol=1e-4, atol=1e-8)
    else:
        value_moved = abs(v - base_v) > 1e-6 * scale
        grad_moved = (g - base_g).abs().max() > 1e-6 * max(float(base_g.abs().max()), 1e-12)
        assert value_moved or grad_moved, f"loss {name}: {option}={value!r} changes nothing (dropped option?)"


def test_the_options_are_found():
    """The option lists come from the signatures: make sure they are not silently empty."""
    found = {(n, o) for n, o, _, _ in _options()}
    assert {("kd", "temperature"), ("kd", "mask_ignore"), ("pdd", "alpha"), ("pdd", "beta"), ("pdd", "gt_mix"),
            ("vlfd", "global_weight"), ("vlfd", "graph_eps"), ("vlfd", "student_through_pool")} <= found


def test_kd_module_defaults_are_the_documented_ones():
    """kd.py documents T = 1 and ignored pixels masked (CIRKD's --kd-temperature 1); pinned by value, with the
    plain-Python KL written here."""
    import math

    from _ref import kl_list, softmax_list

    inp = _inputs()
    kd = LOSSES.get("kd")(LossContext(**CTX))
    assert kd.weights == {"kd": 1.0}
    got = kd(inp)["kd"].item()
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            LOSSES.get("kd")(LossContext(**CTX), temperature=bad)
    zs, zt, y = inp.student_logits.detach().double(), inp.teacher_logits.double(), inp.target
    total, n = 0.0, 0
    for b in range(2):
        for i in range(8):
            for j in range(10):
                if int(y[b, i, j]) == 255:
                    continue
                n += 1
                total += kl_list(softmax_list(zt[b, :, i, j].tolist()), softmax_list(zs[b, :, i, j].tolist()))
    assert n == 140 and math.isfinite(got) and got == pytest.approx(total / n, rel=1e-5)


def test_kd_module_uses_the_context_ignore_index():
    """The ignore value comes from the LossContext (here 4, a class id otherwise): a module passing the default
    255 instead would average over the pixels labelled 4 too."""
    inp = _inputs()
    inp.target[1, 3:] = 4
    ctx = LossContext(**dict(CTX, ignore_index=4))
    got = LOSSES.get("kd")(ctx, temperature=2.0)(inp)["kd"]
    kl = (torch.log_softmax(inp.teacher_logits / 2, 1).exp()
          * (torch.log_softmax(inp.teacher_logits / 2, 1) - torch.log_softmax(inp.student_logits.detach() / 2, 1))).sum(1)
    keep = inp.target != 4
    assert got.item() == pytest.approx(4 * float(kl[keep].mean()), rel=1e-5)
    assert abs(4 * float(kl[inp.target != 255].mean()) - got.item()) > 1e-3 * got.item()


def test_the_registry_names_each_loss_and_its_term() -> None:
    """The name is written once, in ``@LOSSES.register("name")``: the class gets it as ``registry_name`` and
    logs its single term under it; a plugin registered without the attribute gets it too."""
    from c2vkd.losses import DistillLoss
    from c2vkd.registry import Registry

    expected = {"adv", "at", "ce", "cirkd", "cwd", "dist", "dkd", "fitnet", "ifvd", "kd", "pdd", "skd", "vlfd"}
    assert expected <= set(LOSSES.names())
    for name in expected:
        cls = LOSSES.get(name)
        assert cls.registry_name == name and cls.term_name() == name, name
        assert "registry_name" in vars(cls)  # set on the class itself, not inherited from a registered parent

    reg: Registry[type[DistillLoss]] = Registry("loss", name_attr="registry_name")

    @reg.register("my_term")
    class MyPluginLoss(DistillLoss):
        requires_teacher = False

    class Subclass(MyPluginLoss):
        pass

    reg.add("my_sub", Subclass)
    reg.add("my_alias", MyPluginLoss)  # a second name for the same class keeps the first
    assert MyPluginLoss.term_name() == "my_term" and Subclass.term_name() == "my_sub"
    ctx = LossContext(num_classes=3)
    assert MyPluginLoss(ctx, weight=0.5).weights == {"my_term": 0.5}

    class Unregistered(DistillLoss):
        pass

    assert Unregistered.term_name() == "unregistered"  # not registered: the lower-case class name, as before
    assert not hasattr(Registry("model").register("f")(lambda: None), "registry_name")  # other registries: untouched
