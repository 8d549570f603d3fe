"""llkd (sample selection) and ferkd (calibrated soft labels) against hand-made batches."""

import math

import pytest
import torch

from distillery.config import TermConfig
from distillery.errors import DistilleryError
from distillery.losses import get
from distillery.losses.selection import LLKDState, ferkd, llkd
from distillery.objective import Objective

kd = get("kd")


def _soft_ce(target, logits):
    return -sum(p * math.log(q) for p, q in zip(target, torch.softmax(torch.tensor(logits), -1).tolist()))


def test_ferkd_picks_the_target_by_the_teachers_true_class_probability():
    # teacher p(true) = 0.1 (hard region), 0.9 (soft region), and 0.02 (discarded with low = 0.05)
    t = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.9, 0.05, 0.05], [0.02, 0.49, 0.49]]))
    s = torch.tensor([[0.5, 0.0, -0.5], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    y = torch.tensor([0, 0, 0])
    got = ferkd(s, t, targets=y, low=0.05, mid=0.2, high=1.0, smoothing=0.1, reduction="none")
    want0 = _soft_ce([0.9, 0.05, 0.05], s[0].tolist())
    want1 = _soft_ce([0.9, 0.05, 0.05], s[1].tolist())  # the teacher's own soft label here
    assert got.tolist() == pytest.approx([want0, want1, 0.0], rel=1e-5)
    assert ferkd(s, t, targets=y, low=0.05).item() == pytest.approx((want0 + want1) / 2, rel=1e-5)
    # high < 0.9 discards the easy row too; an unlabelled row keeps the teacher's soft label
    assert ferkd(s, t, targets=y, low=0.05, high=0.8, reduction="none")[1].item() == 0.0
    unl = ferkd(s, t, targets=torch.tensor([-100, 0, 0]), low=0.05, reduction="none")
    assert unl[0].item() == pytest.approx(_soft_ce([0.1, 0.6, 0.3], s[0].tolist()), rel=1e-5)
    with pytest.raises(DistilleryError, match="low <= mid <= high"):
        ferkd(s, t, targets=y, low=0.5, mid=0.2)


def test_ferkd_with_every_row_soft_equals_soft_cross_entropy():
    torch.manual_seed(0)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    got = ferkd(s, t, targets=torch.zeros(5, dtype=torch.long), mid=0.0)
    want = -(t.softmax(-1) * s.log_softmax(-1)).sum(-1).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_llkd_keeps_confident_teacher_and_uncertain_student_rows():
    # thresholds at their start: conf 1/C and uncertainty 1 scaled by class ratios = 1, so fix them by hand
    st = LLKDState((2,), (2,))
    st.conf.fill_(0.8)
    st.unc.fill_(0.5)
    st.eval()  # no update: exactly the thresholds above
    t = torch.log(torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.95, 0.05], [0.1, 0.9]]))
    s = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.99, 0.01], [0.6, 0.4]]))
    per_row = llkd(s, t, state=st, reduction="none", temperature=1.0)
    # row 0: conf 0.9, student uniform -> kept; row 1: teacher not confident; row 2: student sure;
    # row 3: conf 0.9 (class 1), student entropy 0.971 bits -> kept
    want = kd(s, t, temperature=1.0, reduction="none")
    assert per_row.tolist() == pytest.approx([want[0].item(), 0.0, 0.0, want[3].item()], rel=1e-6)
    assert llkd(s, t, state=st).item() == pytest.approx((want[0] + want[3]).item() / 2, rel=1e-6)
    hard = llkd(s, t, state=st, hard=True, reduction="none")
    assert hard[0].item() == pytest.approx(math.log(2), rel=1e-6)


def test_llkd_thresholds_follow_the_moving_averages_and_report_the_share():
    st = LLKDState((3,), (3,))
    torch.manual_seed(0)
    s, t = torch.randn(64, 3), 3 * torch.randn(64, 3)
    llkd(s, t, state=st, momentum=0.5)
    conf = t.softmax(-1).max(-1).values.double().mean()
    assert float(st.conf) == pytest.approx(0.5 / 3 + 0.5 * float(conf), rel=1e-9)
    assert 0 < float(st.kept) < 1
    obj = Objective([TermConfig(loss="llkd")])
    obj.build({"logits": s}, {"logits": t})
    out = obj({"logits": s}, {"logits": t}, {"x": s})
    assert "llkd/kept" in out["terms"] and set(out["terms"]) == {"llkd", "llkd/kept"}
    with pytest.raises(DistilleryError, match="LLKDState"):
        llkd(s, t)
