"""The one stage start-up: run folder policy, resume into prepared objects and script state, metrics rows."""

from __future__ import annotations

import pytest
import torch

from medpretrain.cli import UserError
from medpretrain.config import BackboneConfig
from medpretrain.resume import Counter, list_checkpoints
from medpretrain.stage import RunFolderExists, start_stage


def _cfg():
    return BackboneConfig(arch="cbr_tiny")


def _start(tmp_path, resume="", run_name="r"):
    return start_stage("t", _cfg(), out_dir=str(tmp_path), run_name=run_name, resume=resume, seed=3,
                       fields=["step", "loss"], log_with="none")


def test_fresh_run_then_resume_restores_model_optimizer_and_state(tmp_path):
    st = _start(tmp_path)
    assert st.run_dir == tmp_path / "r" and st.resume_from is None
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, opt = st.accelerator.prepare(model, opt)
    step = Counter()
    assert st.begin({"step": step}, step) == 0
    assert (st.run_dir / "config.yaml").is_file()
    for s in (1, 2, 3):
        loss = model(torch.ones(4, 3)).pow(2).mean()
        st.accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        step.value = s
        st.guard.update(loss, s)
        st.log({"loss": loss.item()}, s)
        if s == 2:
            st.checkpoint(s, {"step": step})
            saved = {k: v.clone() for k, v in model.state_dict().items()}
    st.finish()
    assert [int(r["step"]) for r in st.metrics.rows()] == [1, 2, 3]

    # Without resume the folder is refused (one policy, one error type for every stage) ...
    with pytest.raises(RunFolderExists, match=r"exists; pass train.resume=auto"):
        _start(tmp_path)
    assert issubclass(RunFolderExists, UserError)
    # ... with resume=auto it continues from the step-2 checkpoint and drops the step-3 row.
    st2 = _start(tmp_path, resume="auto")
    assert st2.resume_from == list_checkpoints(tmp_path / "r" / "checkpoints")[-1]
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    model2, opt2 = st2.accelerator.prepare(model2, opt2)
    step2 = Counter()
    assert st2.begin({"step": step2}, step2) == 2 and step2.value == 2
    for k, v in model2.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert opt2.state_dict()["state"], "optimizer momentum was not restored"
    assert [int(r["step"]) for r in st2.metrics.rows()] == [1, 2]
    assert st2.last_checkpoint == st2.resume_from
    st2.finish()


def test_finished_run_is_refused_and_nan_guard_names_the_last_checkpoint(tmp_path):
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "backbone.safetensors").write_bytes(b"x")
    with pytest.raises(RunFolderExists, match=r"already finished \(backbone.safetensors exists\)"):
        _start(tmp_path, resume="auto", run_name="done")
    st = _start(tmp_path, run_name="nan")
    st.begin()
    st.guard.update(torch.tensor(float("nan")), 5)
    with pytest.raises(Exception, match=r"not finite .* at step 5; stopping\. no checkpoint was written"):
        st.check_finite()


def test_resume_auto_without_checkpoint_starts_again_without_old_rows(tmp_path):
    st = _start(tmp_path)
    st.begin()
    st.log({"loss": 1.0}, 1)
    st.finish()
    st2 = _start(tmp_path, resume="auto")
    assert st2.resume_from is None
    assert st2.begin() == 0 and st2.metrics.rows() == []
    st2.finish()


def test_finished_run_with_a_checkpoint_can_be_extended_but_not_restarted(tmp_path):
    st = _start(tmp_path, run_name="f")
    st.begin()
    st.checkpoint(4)
    (st.run_dir / "backbone.safetensors").write_bytes(b"x")
    st.finish()
    with pytest.raises(RunFolderExists, match=r"f: already finished"):
        _start(tmp_path, run_name="f")
    st2 = _start(tmp_path, resume="auto", run_name="f")
    assert st2.resume_from is not None and st2.begin() == 4
    st2.finish()
