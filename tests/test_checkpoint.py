"""Backbone checkpoint contract: round trips, metadata, exact keys, clear errors, atomic writes."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from medpretrain import checkpoint
from medpretrain.backbones import build_backbone
from medpretrain.checkpoint import (
    BackboneMeta,
    CheckpointError,
    load_backbone,
    load_exact,
    load_state_dict,
    read_meta,
    save_backbone,
    save_state_dict,
)

torch.set_num_threads(1)


def _meta(**kw: object) -> BackboneMeta:
    base: dict[str, object] = dict(
        arch="cbr_tiny", in_channels=1, stem="small", image_size=28, mean=[0.25], std=[0.5], method="simclr",
        dataset="medmnist:pneumoniamnist", dataset_hash="abc123", epochs=3, steps=42,
        config={"optim": {"lr": 0.001}, "data": {"dataset": "medmnist:pneumoniamnist"}}, extra={"note": "x"},
    )
    base.update(kw)
    return BackboneMeta(**base)  # type: ignore[arg-type]


def _trained(arch: str = "cbr_tiny", stem: str = "small", in_channels: int = 1):
    torch.manual_seed(1)
    b = build_backbone(arch, in_channels, stem)
    b.train()
    with torch.no_grad():  # move BN running stats away from their defaults
        b(torch.randn(4, in_channels, 28, 28) * 3 + 1)
    return b.eval()


def test_round_trip_identical_outputs_and_meta(tmp_path: Path) -> None:
    b = _trained()
    meta = _meta()
    path = save_backbone(tmp_path / "run" / "backbone.safetensors", b, meta)
    assert path.exists() and not list(path.parent.glob(".*.tmp"))
    b2, meta2 = load_backbone(path, arch="cbr_tiny", in_channels=1, image_size=28)
    assert meta2 == meta
    assert meta2.to_dict() == meta.to_dict()
    assert meta2.code_version and meta2.created.endswith("+00:00")
    assert read_meta(path) == meta
    x = torch.randn(3, 1, 33, 34)
    with torch.no_grad():
        assert torch.equal(b(x), b2.eval()(x))
    sd, sd2 = b.state_dict(), b2.state_dict()
    assert set(sd) == set(sd2)
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert int(sd2["blocks.0.bn.num_batches_tracked"]) == 1


def test_round_trip_resnet18(tmp_path: Path) -> None:
    b = _trained("resnet18")
    path = save_backbone(tmp_path / "r.safetensors", b, _meta(arch="resnet18"))
    b2, _ = load_backbone(path)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(b(x), b2.eval()(x))
        for m1, m2 in zip(b.forward_features(x), b2.forward_features(x), strict=True):
            assert torch.equal(m1, m2)


def test_header_holds_json_metadata(tmp_path: Path) -> None:
    path = save_backbone(tmp_path / "b.safetensors", _trained(), _meta())
    with safetensors.safe_open(str(path), framework="pt") as f:
        md = f.metadata()
    assert md["medpretrain_kind"] == "backbone"
    decoded = json.loads(md["medpretrain"])
    assert decoded["arch"] == "cbr_tiny" and decoded["steps"] == 42 and decoded["format_version"] == 1
    assert decoded["config"]["optim"]["lr"] == 0.001


def test_wrong_arch_and_channels_name_file_and_values(tmp_path: Path) -> None:
    path = save_backbone(tmp_path / "b.safetensors", _trained(), _meta())
    with pytest.raises(ValueError, match=r"b\.safetensors: checkpoint holds arch 'cbr_tiny', but arch 'resnet18'"):
        load_backbone(path, arch="resnet18")
    with pytest.raises(ValueError, match=r"b\.safetensors: checkpoint has in_channels=1, but in_channels=3"):
        load_backbone(path, in_channels=3)


def test_meta_must_match_module(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="meta.arch='resnet18' but the backbone has arch='cbr_tiny'"):
        save_backbone(tmp_path / "b.safetensors", _trained(), _meta(arch="resnet18"))


def test_truncated_file(tmp_path: Path) -> None:
    path = save_backbone(tmp_path / "b.safetensors", _trained(), _meta())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"b\.safetensors: truncated: header promises \d+ bytes, file has"):
        load_backbone(path)
    path.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match=r"b\.safetensors: not a safetensors file"):
        read_meta(path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=r"b\.safetensors: not a safetensors file \(only 5 bytes\)"):
        read_meta(path)


def test_pickle_file_is_rejected_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(build_backbone("cbr_tiny").state_dict(), path)
    with pytest.raises(CheckpointError, match=r"resnet18\.pth: not a safetensors file"):
        load_backbone(path)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"notes\.safetensors: not a safetensors file"):
        read_meta(text)


def test_missing_file_and_missing_metadata(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        read_meta(tmp_path / "nope.safetensors")
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match=r"plain\.safetensors: safetensors file without 'medpretrain'"):
        read_meta(plain)
    whole = save_state_dict(tmp_path / "model.safetensors", {"w": torch.zeros(2)}, {"task": "x"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: is a 'state_dict' checkpoint, expected"):
        load_backbone(whole)


def test_newer_format_is_refused(tmp_path: Path) -> None:
    path = save_backbone(tmp_path / "b.safetensors", _trained(), _meta(format_version=99))
    with pytest.raises(CheckpointError, match="format_version 99 is newer"):
        read_meta(path)


def test_key_mismatch_lists_keys(tmp_path: Path) -> None:
    b = _trained()
    sd = b.state_dict()
    sd["blocks.9.conv.weight"] = torch.zeros(1)
    del sd["blocks.0.bn.running_mean"]
    # A tampered file, written with the same metadata.
    header = {"medpretrain": json.dumps(_meta().to_dict()), "medpretrain_kind": "backbone"}
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=header)
    with pytest.raises(ValueError, match=r"bad\.safetensors: keys do not match .*missing \['blocks\.0\.bn\."
                       r"running_mean'\].*unexpected \['blocks\.9\.conv\.weight'\]"):
        load_backbone(path)


def test_load_exact_shapes_and_ignore() -> None:
    b = build_backbone("cbr_tiny")
    sd = {k: v.clone() for k, v in b.state_dict().items()}
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(2, 128), torch.zeros(2)
    with pytest.raises(ValueError, match=r"src: keys do not match .*unexpected \['fc.bias', 'fc.weight'\]"):
        load_exact(b, sd, "src")
    load_exact(b, sd, "src", ignore={"fc.weight", "fc.bias"})
    with pytest.raises(ValueError, match=r"expected keys \['head.w'\] to be present"):
        load_exact(b, sd, "src", ignore={"fc.weight", "fc.bias", "head.w"})
    sd2 = dict(b.state_dict())
    sd2["blocks.0.conv.weight"] = torch.zeros(16, 3, 5, 5)
    with pytest.raises(ValueError, match=r"blocks\.0\.conv\.weight: file \[16, 3, 5, 5\] vs model \[16, 1, 5, 5\]"):
        load_exact(b, sd2, "src")


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "backbone.safetensors"
    save_backbone(path, _trained(), _meta(steps=1))
    before = path.read_bytes()

    def failing_save(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"partial garbage")  # half-written, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_backbone(path, _trained(), _meta(steps=2))
    assert path.read_bytes() == before
    assert read_meta(path).steps == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.safetensors"]


def test_state_dict_helpers_round_trip(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    sd = model.state_dict()
    sd_t = {"0.weight": sd["0.weight"].t()}  # non-contiguous input is made contiguous
    path = save_state_dict(tmp_path / "m.safetensors", {**sd, **sd_t}, {"task": "binary", "classes": [0, 1]})
    tensors, meta = load_state_dict(path)
    assert meta == {"task": "binary", "classes": [0, 1]}
    assert torch.equal(tensors["0.weight"], sd["0.weight"].t())
    assert torch.equal(tensors["1.running_var"], sd["1.running_var"])
    with pytest.raises(CheckpointError, match=r"is a 'backbone' checkpoint, expected a 'state_dict'"):
        load_state_dict(save_backbone(tmp_path / "b.safetensors", _trained(), _meta()))


def test_header_length_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="bad header length"):
        read_meta(path)


def _tampered(tmp_path: Path, name: str, drop: tuple[str, ...] = (), add: dict | None = None) -> Path:
    """A backbone file whose tensors lack ``drop`` and carry ``add``, written with valid metadata."""
    sd = {k: v.contiguous() for k, v in _trained().state_dict().items() if k not in drop}
    sd.update(add or {})
    header = {"medpretrain": json.dumps(_meta().to_dict()), "medpretrain_kind": "backbone"}
    path = tmp_path / name
    safetensors.torch.save_file(sd, str(path), metadata=header)
    return path


@pytest.mark.parametrize("key", ["blocks.0.bn.running_mean", "blocks.1.conv.weight"])
def test_only_missing_keys_are_refused_naming_them(tmp_path: Path, key: str) -> None:
    """Regression (issue 20): a loader that allowed missing keys passed the suite, because the only
    missing-key case also had an unexpected key. A buffer and a weight are each enough to refuse."""
    path = _tampered(tmp_path, "short.safetensors", drop=(key,))
    with pytest.raises(ValueError, match=rf"short\.safetensors: keys do not match .*missing \['{re.escape(key)}'\] "
                                         r"\(1\), unexpected \[\] \(0\)"):
        load_backbone(path)
    b = build_backbone("cbr_tiny")
    before = {k: v.clone() for k, v in b.state_dict().items()}
    sd = {k: v for k, v in _trained().state_dict().items() if k != key}
    with pytest.raises(ValueError, match=rf"missing \['{re.escape(key)}'\]"):
        load_exact(b, sd, "src")
    assert all(torch.equal(v, before[k]) for k, v in b.state_dict().items()), "a refused load changed weights"


def test_only_unexpected_keys_are_refused_naming_them(tmp_path: Path) -> None:
    path = _tampered(tmp_path, "long.safetensors", add={"projection_head.layers.0.weight": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match=r"long\.safetensors: keys do not match .*missing \[\] \(0\), "
                                         r"unexpected \['projection_head\.layers\.0\.weight'\] \(1\)"):
        load_backbone(path)


def test_exact_load_restores_every_tensor(tmp_path: Path) -> None:
    src = _trained()
    path = _tampered(tmp_path, "ok.safetensors")
    loaded, _ = load_backbone(path)
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


# Mutation-testing gaps (benchmarks/results/mutation.md): each test below kills mutants that survived.


def _raw_file(path: Path, header: bytes, payload: bytes = b"") -> Path:
    """A file of an 8-byte little-endian header length, ``header`` and ``payload``."""
    path.write_bytes(struct.pack("<Q", len(header)) + header + payload)
    return path


def test_checkpoint_error_keeps_path_and_reason(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        read_meta(tmp_path)
    assert info.value.path == tmp_path and info.value.reason == "is a directory, not a checkpoint file"
    assert str(info.value) == f"{tmp_path}: is a directory, not a checkpoint file"


def test_meta_from_dict_defaults_unknown_keys_and_source(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"^<dict>: backbone metadata lacks \['in_channels', 'stem'\]$") as info:
        BackboneMeta.from_dict({"arch": "cbr_tiny"})
    assert info.value.path == Path("<dict>")
    meta = BackboneMeta.from_dict({"arch": "cbr_tiny", "in_channels": 1, "stem": "small"})
    assert meta.format_version == 1 and meta.extra == {} and meta.image_size is None
    newer = BackboneMeta.from_dict({"arch": "cbr_tiny", "in_channels": 1, "stem": "small", "extra": {"a": 1},
                                    "new_field": [3]})
    assert newer.extra == {"a": 1, "_unknown": {"new_field": [3]}}
    # read_meta names the file, not "<dict>".
    header = {"medpretrain": json.dumps({"in_channels": 1, "stem": "small"}), "medpretrain_kind": "backbone"}
    path = tmp_path / "noarch.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(1)}, str(path), metadata=header)
    with pytest.raises(CheckpointError, match=r"noarch\.safetensors: backbone metadata lacks \['arch'\]$"):
        read_meta(path)


def test_written_header_is_sorted_json_with_format_and_logged(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    # Paths, numpy / torch scalars and arrays are written as JSON (arrays with more than one element used to
    # raise: .item() was tried before .tolist()).
    meta = {"zeta": 1, "alpha": {"b": 2, "a": 1}, "path": Path("runs/x"), "scalar": torch.tensor(0.5),
            "array": torch.arange(3), "np": np.array([[1.5], [2.0]]), "np_scalar": np.float32(0.25)}
    with caplog.at_level("INFO", logger="medpretrain.checkpoint"):
        path = save_state_dict(tmp_path / "m.safetensors", {"w": torch.zeros(2), "b": torch.ones(1)}, meta)
    assert [r.getMessage() for r in caplog.records if r.name == "medpretrain.checkpoint"] == [
        f"wrote {path} (state_dict, 2 tensors)"]
    with safetensors.safe_open(str(path), framework="pt") as f:
        md = f.metadata()
    assert md == {"format": "pt", "medpretrain_kind": "state_dict", "medpretrain":
                  '{"alpha": {"a": 1, "b": 2}, "array": [0, 1, 2], "np": [[1.5], [2.0]], "np_scalar": 0.25, '
                  '"path": "runs/x", "scalar": 0.5, "zeta": 1}'}
    assert load_state_dict(path)[1] == {"alpha": {"a": 1, "b": 2}, "array": [0, 1, 2], "np": [[1.5], [2.0]],
                                        "np_scalar": 0.25, "path": "runs/x", "scalar": 0.5, "zeta": 1}
    class Scalar:  # duck-typed scalar without .tolist()
        def item(self) -> int:
            return 7

    save_state_dict(tmp_path / "duck.safetensors", {"w": torch.zeros(1)}, {"s": Scalar()})
    assert load_state_dict(tmp_path / "duck.safetensors")[1] == {"s": 7}
    with pytest.raises(TypeError, match=r"^metadata value of type object is not JSON-serialisable: <object"):
        save_state_dict(tmp_path / "obj.safetensors", {"w": torch.zeros(1)}, {"o": object()})
    with pytest.raises(TypeError, match=r"^state_dict\['n'\] is a int, not a tensor$"):
        save_state_dict(tmp_path / "bad.safetensors", {"w": torch.zeros(1), "n": 3}, {})  # type: ignore[dict-item]


def test_header_length_edge_cases(tmp_path: Path) -> None:
    bad_length = r"^.*: not a safetensors file \(bad header length\); was it saved with torch\.save\?$"
    for n, name in ((0, "zero"), (2**64 - 1, "negative_if_signed"), (1000, "longer_than_file")):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(struct.pack("<Q", n) + b"{}" + b" " * 10)
        with pytest.raises(CheckpointError, match=bad_length):
            read_meta(path)
    # A header that ends exactly at the end of the file is complete (no tensors, no metadata).
    exact = _raw_file(tmp_path / "exact.safetensors", b"{}")
    with pytest.raises(CheckpointError, match=r"exact\.safetensors: safetensors file without 'medpretrain' "):
        read_meta(exact)


def test_corrupt_headers_name_the_problem(tmp_path: Path) -> None:
    cases = {
        b"{x}": r"not a safetensors file \(header is not JSON\)",
        b"\xff\xfe": r"not a safetensors file \(header is not JSON\)",
        b"[1, 2]": r"not a safetensors file \(header is not a mapping\)",
        b'{"w": {"dtype": "F32", "shape": [1]}}': r"corrupt safetensors header entry 'w'",
    }
    for i, (header, reason) in enumerate(cases.items()):
        path = _raw_file(tmp_path / f"c{i}.safetensors", header)
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: {reason}$") as info:
            read_meta(path)
        assert info.value.path == path


def test_truncation_reports_promised_size(tmp_path: Path) -> None:
    path = save_backbone(tmp_path / "b.safetensors", _trained(), _meta())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=rf"truncated: header promises {len(data)} bytes, file has "
                                              rf"{len(data) - 100}$"):
        read_meta(path)


def test_metadata_kind_and_json_checks(tmp_path: Path) -> None:
    meta = json.dumps(_meta().to_dict())
    legacy = tmp_path / "legacy.safetensors"  # written before the kind key existed: a backbone
    safetensors.torch.save_file({k: v.contiguous() for k, v in _trained().state_dict().items()}, str(legacy),
                                metadata={"medpretrain": meta})
    assert read_meta(legacy).to_dict() == json.loads(meta)
    for i, (text, reason) in enumerate((("{bad", r"'medpretrain' metadata is not JSON \(Expecting"),
                                        ("[1]", r"'medpretrain' metadata is not a JSON object$"))):
        path = tmp_path / f"m{i}.safetensors"
        safetensors.torch.save_file({"w": torch.zeros(1)}, str(path),
                                    metadata={"medpretrain": text, "medpretrain_kind": "backbone"})
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: {reason}") as info:
            read_meta(path)
        assert info.value.path == path


def test_unreadable_tensors_are_a_checkpoint_error(tmp_path: Path) -> None:
    md = {"medpretrain": json.dumps(_meta().to_dict()), "medpretrain_kind": "backbone"}
    header = json.dumps({"__metadata__": md, "w": {"dtype": "NOPE", "shape": [1], "data_offsets": [0, 4]}})
    path = _raw_file(tmp_path / "odd.safetensors", header.encode(), b"\0" * 4)
    assert read_meta(path).arch == "cbr_tiny"  # the header is fine
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: cannot read tensors \(") as info:
        load_backbone(path)
    assert info.value.path == path


def _linears(n: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(*[torch.nn.Linear(1, 1, bias=False) for _ in range(n)])


def test_key_mismatch_message_lists_at_most_20_keys_and_names_arch() -> None:
    for n, dots in ((20, ""), (21, " ...")):
        keys = sorted(f"{i}.weight" for i in range(n))
        with pytest.raises(ValueError, match=rf"^src: keys do not match Sequential: missing "
                                             rf"{re.escape(str(keys[:20]))}{re.escape(dots)} \({n}\), "
                                             r"unexpected \[\] \(0\)$"):
            load_exact(_linears(n), {}, "src")
        extra = {f"x{i:02d}": torch.zeros(1) for i in range(n)}
        with pytest.raises(ValueError, match=rf"^src: keys do not match Sequential: missing \[\] \(0\), unexpected "
                                             rf"{re.escape(str(sorted(extra)[:20]))}{re.escape(dots)} \({n}\)$"):
            load_exact(torch.nn.Sequential(), extra, "src")
    b = build_backbone("cbr_tiny")
    with pytest.raises(ValueError, match=rf"^src: keys do not match {type(b).__name__} cbr_tiny: missing \["):
        load_exact(b, {}, "src")


def test_shape_mismatch_lists_at_most_10() -> None:
    model = _linears(11)
    state = {f"{i}.weight": torch.zeros(2, 1) for i in range(11)}
    shown = "; ".join(f"{i}.weight: file [2, 1] vs model [1, 1]" for i in range(10))
    with pytest.raises(ValueError, match=rf"^src: tensor shapes differ: {re.escape(shown)}$"):
        load_exact(model, state, "src")


def test_load_backbone_image_size_check_and_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # DenseNet-121 with the small stem needs 8 px (the CBR nets and ResNets take any size).
    path = save_backbone(tmp_path / "b.safetensors", build_backbone("densenet121", 1, "small"),
                         _meta(arch="densenet121"))
    with pytest.raises(ValueError, match=r"^densenet121 with stem='small' needs images of at least 8x8, got 4x4$"):
        load_backbone(path, image_size=4)
    with caplog.at_level("WARNING", logger="medpretrain.checkpoint"):
        load_backbone(path, image_size=28)
        assert not caplog.records
        load_backbone(path, image_size=64)
    assert [r.getMessage() for r in caplog.records] == [f"{path}: trained at 28 px (stem small), now used at 64 px"]
    caplog.clear()
    unknown = save_backbone(tmp_path / "u.safetensors", _trained(), _meta(image_size=None))
    with caplog.at_level("WARNING", logger="medpretrain.checkpoint"):
        load_backbone(unknown, image_size=64)
    assert not caplog.records
