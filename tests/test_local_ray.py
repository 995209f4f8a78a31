"""A local Ray started by the project listens on loopback only.

Starts Ray through ``retriever.console.ray_init`` (which every job, the demo and ``retriever
serve`` use, via ``retriever.ops.local_ray.init``) in a subprocess, runs one task so a worker
exists, and lists the listening TCP sockets of that process and all its descendants (GCS,
raylet, dashboard, agents, workers): every one must be on a loopback address.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import json, os, psutil, ray
    from retriever import console
    console.ray_init(num_cpus=1)

    @ray.remote
    def pid():
        return os.getpid()

    ray.get(pid.remote())
    tree = psutil.Process()
    pids = {tree.pid, *(p.pid for p in tree.children(recursive=True))}
    listening = sorted({(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections("inet")
                        if c.status == psutil.CONN_LISTEN and c.pid in pids})
    names = {}
    for _, _, p in listening:
        try:
            names[p] = psutil.Process(p).name()
        except psutil.Error:
            names[p] = "?"
    print("LISTENING " + json.dumps([[ip, port, names[p]] for ip, port, p in listening]))
    ray.shutdown()
""")


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def test_local_ray_listens_on_loopback_only():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "RAY_ADDRESS": "",
                                            "RAY_USAGE_STATS_ENABLED": "0"})
    line = next((x for x in done.stdout.splitlines() if x.startswith("LISTENING ")), None)
    assert done.returncode == 0 and line, done.stdout[-2000:] + done.stderr[-4000:]
    listening = json.loads(line.removeprefix("LISTENING "))
    names = {name for _, _, name in listening}
    assert {"gcs_server", "raylet"} <= names, listening  # the probe saw Ray's servers
    exposed = [row for row in listening if not _is_loopback(row[0])]
    assert not exposed, f"listening beyond loopback: {exposed}"
