import math

import torch

from tunewright.training.lr_schedule import cosine_with_warmup


def test_cosine_with_warmup_shape():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, num_warmup_steps=4, num_training_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]  # linear warm-up to the peak
    # halfway through the decay: cos(pi/2) -> half the peak
    assert math.isclose(lrs[12], 0.5, abs_tol=1e-9)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # monotone decay after warm-up
    assert opt.param_groups[0]["lr"] < 1e-12  # reaches zero at num_training_steps
