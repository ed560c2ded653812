"""REX schedule against the paper's formula (Chen et al. 2022, eq. for REX), computed here."""

import pytest
import torch

from tunewright.training.lr_schedule import rex_with_warmup


def _lrs(sched_opt, steps: int) -> list[float]:
    sched, opt = sched_opt
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    out.append(opt.param_groups[0]["lr"])
    return out


def _make(**kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    return rex_with_warmup(opt, **kw), opt


def test_rex_equals_paper_formula_after_warmup():
    lr0, warmup, total = 3e-4, 5, 45
    lrs = _lrs(_make(num_training_steps=total, num_warmup_steps=warmup), total)
    for step in (0, 2, 5, 6, 15, 25, 35, 44, 45):
        if step < warmup:
            expected = lr0 * step / warmup
        else:
            z = (step - warmup) / (total - warmup)  # the paper's progress t/T
            expected = lr0 * (1 - z) / (0.5 + 0.5 * (1 - z))
        assert lrs[step] == pytest.approx(expected, rel=1e-12, abs=1e-18), step
    assert lrs[warmup] == pytest.approx(lr0)  # peak right after warm-up
    assert lrs[total] == 0.0


def test_rex_beta_and_floor():
    lr0, total = 3e-4, 10
    lrs = _lrs(_make(num_training_steps=total, rex_beta=0.9, min_lr_ratio=0.1), total)
    z = 0.3
    rex = (1 - z) / (0.1 + 0.9 * (1 - z))  # Axolotl's defaults alpha=0.1, beta=0.9
    assert lrs[3] == pytest.approx(lr0 * (0.1 + 0.9 * rex), rel=1e-12)
    assert lrs[total] == pytest.approx(0.1 * lr0)


def test_rex_bad_beta_is_one_line():
    with pytest.raises(ValueError, match="rex_beta"):
        _make(num_training_steps=10, rex_beta=0.0)


def test_rex_is_selected_from_a_config():
    from pathlib import Path

    from tunewright.training.config import load_config, to_dict
    from tunewright.training.entry import import_recipe
    from tunewright.training.instantiate import instantiate
    from tunewright.training.schema import validate

    repo = Path(__file__).resolve().parent.parent
    path = repo / "configs" / "llama" / "tiny_lora.yaml"
    cfg = load_config(path, ["lr_scheduler._component_=tunewright.training.lr_schedule.rex_with_warmup",
                             "lr_scheduler.num_warmup_steps=2", "lr_scheduler.rex_beta=0.5"])
    validate(to_dict(cfg), import_recipe(repo / "recipes" / "sft.py").Config, str(path))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = instantiate(cfg.lr_scheduler, optimizer=opt, num_training_steps=12)
    for _ in range(7):
        opt.step()
        sched.step()
    z = (7 - 2) / (12 - 2)
    assert opt.param_groups[0]["lr"] == pytest.approx((1 - z) / (0.5 + 0.5 * (1 - z)))
