"""Two ``ctssl-train`` ranks as torchrun would start them: separate processes over gloo on this machine."""
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_ports(n: int) -> list[int]:
    """``n`` TCP ports free on 127.0.0.1 now (each run's MASTER_PORT)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start_ranks(worker_source: str, arg: str, world: int = 2, port: int | None = None) -> list[subprocess.Popen]:
    """``python -c worker_source arg`` once per rank, with torchrun's environment (one thread each)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if port is not None:
        env["MASTER_PORT"] = str(port)
    return [subprocess.Popen([sys.executable, "-c", worker_source, arg], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
            for r in range(world)]


def wait_for_ranks(procs: list[subprocess.Popen], timeout: float) -> None:
    """Every rank exits 0 (else an AssertionError with its output's tail); none is left running."""
    try:
        for r, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"rank {r} failed:\n{out[-3000:]}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
