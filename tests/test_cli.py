import json
import subprocess
import sys

import pytest

from qlin import cli


def test_info_json_lists_every_kernel_with_a_verdict(capsys):
    assert cli.main(["info", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["platform"] == "cpu"
    assert len(out["configs"]) == len(cli.SHOWCASE_CONFIGS)
    for row in out["configs"]:
        assert row["chosen"] == "xla"
        assert [v["kernel"] for v in row["verdicts"]][:2] == ["xla", "reference"]


def test_info_table(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "Kernel selection per config" in out and "fp8 per-channel, per-token" in out


def test_demo_small_runs_and_reports_errors(capsys):
    assert cli.main(["demo", "--hidden", "64", "--intermediate", "128", "--tokens", "8", "--repeats", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["config"] == "bf16 (unquantized)"
    assert len(rows) == 1 + len(cli.SHOWCASE_CONFIGS)
    for r in rows:
        assert 0 < r["rel_err"] < 0.15, r
        assert r["ms"] > 0


def test_demo_rejects_bad_sizes():
    with pytest.raises(SystemExit):
        cli.main(["demo", "--hidden", "0"])


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "qlin.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("qlin ")
