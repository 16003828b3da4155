import json

import pytest
import torch

from rlhf_cli import checkpoint as ck
from rlhf_cli.errors import UserError


def test_atomic_dir_replaces_only_on_success(tmp_path):
    final = tmp_path / "out"
    with ck.atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (final / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError), ck.atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("two")
        raise RuntimeError("disk full")
    assert (final / "a.txt").read_text() == "one"  # the old checkpoint is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp sibling left
    with ck.atomic_dir(final) as tmp:
        (tmp / "b.txt").write_text("three")
    assert [p.name for p in final.iterdir()] == ["b.txt"]


def test_optimizer_state_round_trips_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    ck.save_trainer_state(tmp_path / "s", opt, sched, {"step": 3})
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["optimizer.json", "optimizer.safetensors", "state.json"]
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 0.5)
    progress = ck.load_trainer_state(tmp_path / "s", opt2, sched2)
    assert progress == {"step": 3} and sched2.last_epoch == sched.last_epoch
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state_dict()["state"][0][k], opt2.state_dict()["state"][0][k])


def test_a_nested_state_round_trips_through_safetensors_and_json(tmp_path):
    """The shape of a ZeRO optimizer's state_dict: int keys, tuples, a loss-scaler object, an enum."""
    import enum

    class Stage(enum.IntEnum):
        gradients = 2

    class Scaler:
        def __init__(self, scale):
            self.cur_scale, self.cur_iter, self.fn = scale, 0, print

    def state(seed, scale):
        g = torch.Generator().manual_seed(seed)
        return {"loss_scaler": Scaler(scale), "overflow": False, "zero_stage": Stage.gradients,
                "base_optimizer_state": {"state": {0: {"exp_avg": torch.randn(5, generator=g), "step": torch.tensor(7.0)}},
                                         "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": [0]}]},
                "single_partition_of_fp32_groups": [torch.randn(5, generator=g)], "mapping": {object(): 1}}

    saved, live = state(0, 1024.0), state(1, 1.0)
    saved["loss_scaler"].cur_iter = 9
    ck.save_nested(saved, tmp_path / "rank-00000", {"world_size": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank-00000.json", "rank-00000.safetensors"]
    assert ck.read_nested_meta(tmp_path / "rank-00000") == {"world_size": 2}
    back = ck.load_nested(tmp_path / "rank-00000", live)
    assert torch.equal(back["base_optimizer_state"]["state"][0]["exp_avg"], saved["base_optimizer_state"]["state"][0]["exp_avg"])
    assert back["base_optimizer_state"]["state"][0]["step"].item() == 7.0
    assert torch.equal(back["single_partition_of_fp32_groups"][0], saved["single_partition_of_fp32_groups"][0])
    assert back["base_optimizer_state"]["param_groups"] == [{"lr": 0.1, "betas": (0.9, 0.95), "params": [0]}]
    # the live loss scaler gets the saved counters; what JSON cannot hold comes from the live state
    assert back["loss_scaler"] is live["loss_scaler"] and (live["loss_scaler"].cur_scale, live["loss_scaler"].cur_iter) == (1024.0, 9)
    assert back["zero_stage"] is Stage.gradients and back["mapping"] is not saved["mapping"]


def test_rng_state_round_trip():
    import random

    state = ck.rng_state()
    json.dumps(state)  # JSON, not pickle
    a = (random.random(), torch.rand(1).item())
    ck.set_rng_state(state)
    assert (random.random(), torch.rand(1).item()) == a


def test_prepare_output_guards(tmp_path):
    out = tmp_path / "run"
    assert ck.prepare_output(out, resume=False, overwrite=False) is None
    out.mkdir()
    (out / "x").write_text("keep me")
    with pytest.raises(UserError, match="already exists"):
        ck.prepare_output(out, resume=False, overwrite=False)
    with pytest.raises(UserError, match="contradict"):
        ck.prepare_output(out, resume=True, overwrite=True)
    assert ck.prepare_output(out, resume=False, overwrite=True) is None
    assert (out / "x").read_text() == "keep me"  # replaced only when the new run completes
