"""`fleetp2p ls` and `fleetp2p get` against a real agent and registry."""

from __future__ import annotations

import json
import subprocess
import sys

from test_lazy_agent import push_image

from harness.ports import free_port


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleetp2p", *args], capture_output=True, timeout=60)


def setup(layer, registry_factory, agent_factory):
    registry = registry_factory()
    push_image(registry, "lazy/app", layer)
    agent = agent_factory(registry, default=registry)
    return registry, agent, f"{registry.host}/lazy/app:v1"


def test_ls_and_get_read_only_what_they_need(ctr_remote_layers, registry_factory, agent_factory,
                                             expected_files, tmp_path):
    layer = ctr_remote_layers["estargz"]
    registry, agent, ref = setup(layer, registry_factory, agent_factory)
    result = cli("ls", ref, "--agent", agent.url, "--json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    paths = {e["path"] for e in listing["entries"]}
    assert {"etc/hello.txt", "bin/big.bin", "data/sparse.bin"} <= paths
    assert listing["bytes_fetched"] < layer.size / 2
    out = tmp_path / "big.bin"
    result = cli("get", ref, "bin/big.bin", "-o", str(out), "--agent", agent.url, "--json")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == expected_files["bin/big.bin"]
    summary = json.loads(result.stdout)
    assert summary["mode"] == "lazy" and summary["size"] == len(expected_files["bin/big.bin"])
    result = cli("get", ref, "data/sparse.bin", "--agent", agent.url)  # to stdout
    assert result.returncode == 0 and result.stdout == expected_files["data/sparse.bin"]


def test_plain_gzip_layer_falls_back_to_whole_layer(source_layout, registry_factory, agent_factory,
                                                    expected_files, tmp_path):
    from writers import load_layer
    layer = load_layer(source_layout, "v1")
    registry, agent, ref = setup(layer, registry_factory, agent_factory)
    out = tmp_path / "hello"
    result = cli("get", ref, "etc/hello.txt", "-o", str(out), "--agent", agent.url)
    assert result.returncode == 0, result.stderr
    assert b"fetching the whole layer" in result.stderr
    assert out.read_bytes() == expected_files["etc/hello.txt"]


def test_errors_are_one_line(ctr_remote_layers, registry_factory, agent_factory, tmp_path):
    layer = ctr_remote_layers["estargz"]
    registry, agent, ref = setup(layer, registry_factory, agent_factory)
    for args, code in [(("get", ref, "no/such/file", "--agent", agent.url), 1),
                       (("ls", f"{registry.host}/lazy/app:nope", "--agent", agent.url), 1),
                       (("ls", "Bad Ref!", "--agent", agent.url), 2),
                       (("ls", ref, "--agent", f"http://127.0.0.1:{free_port()}"), 1)]:
        result = cli(*args)
        assert result.returncode == code, (args, result.stderr)
        lines = result.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr.decode(), result.stderr
    assert not list(tmp_path.glob("*.part"))
