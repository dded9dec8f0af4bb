"""Atomic writes and output-path containment."""

from __future__ import annotations

import pytest

from medpretrain.utils import atomic_path, atomic_write_text, hash_files, resolve_inside


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp files left behind
    atomic_write_text(target, "new")
    assert target.read_text() == "new"


def test_resolve_inside_refuses_escapes(tmp_path):
    assert resolve_inside(tmp_path, "a/b.png") == (tmp_path / "a" / "b.png").resolve()
    for bad in ("../x", "/etc/passwd", "a/../../x"):
        with pytest.raises(ValueError, match="escapes the output directory"):
            resolve_inside(tmp_path, bad)


def test_hash_files_depends_on_content_not_order(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"1")
    b.write_bytes(b"2")
    h = hash_files([a, b])
    assert h == hash_files([b, a]) and len(h) == 16
    b.write_bytes(b"3")
    assert hash_files([a, b]) != h


def test_fused_optimizer_kwargs_and_same_update_as_the_for_loop() -> None:
    import torch

    from medpretrain.schedules import fused

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
    params = list(net.parameters())
    assert fused(params) is True
    assert fused([{"params": params[:2]}, {"params": params[2:], "lr": 0.1}]) is True
    assert fused([]) is None
    assert fused([torch.zeros(3, dtype=torch.int64)]) is None
    x = torch.randn(5, 1, 8, 8)
    results = []
    for kw in ({"foreach": False}, {"fused": fused(params)}):
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
        model.load_state_dict(net.state_dict())
        opt = torch.optim.AdamW(list(model.parameters()), lr=1e-2, weight_decay=0.1, **kw)
        for _ in range(5):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        results.append(model.state_dict())
    moved = max((results[0][k] - net.state_dict()[k]).abs().max().item() for k in results[0])
    assert moved > 1e-3  # five steps moved the weights ...
    for k in results[0]:  # ... and the fused kernel moved them to the same place
        torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-5, atol=1e-6)


def test_hash_files_with_given_digests_equals_reading_and_reads_nothing(tmp_path):
    from medpretrain.utils import sha256_file

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    digests = {str(a): sha256_file(a), str(b): sha256_file(b)}
    assert hash_files([a, b], digests) == hash_files([a, b])
    a.unlink()  # a given digest is used as it is: the file is not read again
    assert hash_files([a, b], digests) == hash_files([b, a], digests)
    partial = {str(b): digests[str(b)]}  # files without a given digest are read
    b.write_bytes(b"changed")
    assert hash_files([b], partial) != hash_files([b])
