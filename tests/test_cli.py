"""The `adt` command line."""

import pytest

from adt_plugin import doctor
from adt_plugin.cli import main


def test_doctor_reports_each_check_and_exits_zero(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "diffusers", "transformers", "accelerate", "peft", "attention", "DINOv2 backbone"):
        assert f"] {name}:" in out
    # 5 samplers x 4 checks (tiny UNet, CFG) + 3 family cases x 5 (FLUX.1-dev embedded guidance
    # at two resolutions, schnell without guidance: schedule, values, path grad, param grad, graph)
    assert out.count("self-check") == 5 * 4 + 3 * 5 and "all checks passed" in out


def test_doctor_fails_when_a_check_fails(monkeypatch, capsys):
    monkeypatch.setitem(doctor.MINIMUM, "diffusers", "999.0")
    assert main(["doctor", "--no-selfcheck"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] diffusers:" in out and "older than the supported 999.0" in out and "1 check(s) failed" in out


def test_doctor_finds_a_local_backbone_folder(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    main(["doctor", "--no-selfcheck", "--backbone", str(tmp_path)])
    assert f"[ ok ] DINOv2 backbone: local folder {tmp_path}" in capsys.readouterr().out


def test_unknown_command_is_an_error():
    with pytest.raises(SystemExit):
        main(["fly"])
