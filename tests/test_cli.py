"""The command line: help, one-line config errors, exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleetp2p", *args], capture_output=True, text=True,
                          timeout=30)


def test_help_lists_commands():
    result = run("--help")
    assert result.returncode == 0
    assert "agent" in result.stdout


@pytest.mark.parametrize("content,key", [
    ('listen = "nope"', "listen"),
    ('bogus = 1', "bogus"),
    ('tag_ttl = "soon"', "tag_ttl"),
    ('store_max_size = "lots"', "store_max_size"),
    ('[[registries]]\nname = "r.example"\nurl = "ftp://x"', "registries[0].url"),
    ('[[registries]]\nurl = "http://x"', "registries[0].name"),
    ('store_low_watermark = 0.99', "store_low_watermark"),
    ('listen = ', "config"),
    ('tracker_lease_limit = -1', "tracker_lease_limit"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, content, key):
    path = tmp_path / "agent.toml"
    path.write_text(content + "\n")
    result = run("agent", "--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], result.stderr


def test_missing_config_file():
    result = run("agent", "--config", "/nonexistent/agent.toml")
    assert result.returncode == 2 and "no such file" in result.stderr


def test_flag_overrides_file(tmp_path):
    from fleetp2p import config
    path = tmp_path / "agent.toml"
    path.write_text('listen = "127.0.0.1:7000"\ntag_ttl = 5\n')
    cfg = config.load(str(path), {"listen": "127.0.0.1:7001"})
    assert cfg.listen == "127.0.0.1:7001" and cfg.tag_ttl == 5.0
    assert cfg.registry("docker.io").url == "https://registry-1.docker.io"
    assert cfg.registry("ghcr.io").url == "https://ghcr.io"
