import pytest
import torch
from torch import nn

from distillery.errors import DistilleryError
from distillery.taps import Taps, find_module


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 2))


def test_taps_read_outputs_by_path():
    m = net()
    x = torch.randn(3, 4)
    with Taps(m, ["0", "2.1"]) as taps:
        out = m(x)
    assert torch.equal(taps["0"], m[0](x))
    assert torch.equal(taps["2.1"], torch.tanh(m[2][0](torch.relu(m[0](x)))))
    assert out.shape == (3, 2)


def test_wrong_path_names_close_matches():
    m = nn.Sequential()
    m.add_module("layer3", nn.Linear(2, 2))
    m.add_module("layer4", nn.Linear(2, 2))
    with pytest.raises(DistilleryError) as e:
        Taps(m, ["layer5"])
    assert "layer5" in str(e.value) and "layer3" in str(e.value) and "Did you mean" in str(e.value)


def test_hooks_removed_on_exit_and_on_error():
    m = net()
    with Taps(m, ["0"]):
        assert len(m[0]._forward_hooks) == 1
    assert len(m[0]._forward_hooks) == 0
    with pytest.raises(RuntimeError), Taps(m, ["0"]):
        raise RuntimeError("boom")
    assert len(m[0]._forward_hooks) == 0


def test_ddp_wrapper_paths(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        m = net()
        ddp = nn.parallel.DistributedDataParallel(m)
        assert find_module(ddp, "2.0") is m[2][0]
        assert find_module(ddp, "module.2.0") is m[2][0]
        with Taps(ddp, ["2.0"]) as taps:
            ddp(torch.randn(2, 4))
        assert taps["2.0"].shape == (2, 8)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_detach_and_missing_output():
    m = net()
    with Taps(m, ["0", "3"], detach=True) as taps:
        m[0](torch.randn(1, 4))  # only the first layer runs
    assert not taps["0"].requires_grad
    with pytest.raises(KeyError, match="did not run"):
        taps["3"]
