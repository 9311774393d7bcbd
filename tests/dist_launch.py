"""Test helper: run a command as the ranks of one torch.distributed job (the environment torchrun sets, gloo on the
CPU), with a timeout on every rank so a bug cannot hang the test run; and a rank killer.

As a script: `python tests/dist_launch.py KILL_RANK KILL_STEP SCRIPT ARGS...` runs SCRIPT's CLI in this process,
the rank KILL_RANK SIGKILL-ing itself just after training step KILL_STEP (raising RuntimeError("injected failure")
there when KILL_STEP is negative, at step -KILL_STEP; with KILL_STEP "chunk:N", just after recording its N-th chunk
of generate_test_data.py); the other ranks run normally.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@dataclass
class RankResult:
    """What one rank did."""

    returncode: int
    stdout: str
    stderr: str


def free_port() -> int:
    """A TCP port free on this machine now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT_TAKEN = ("Address already in use", "EADDRINUSE", "address already in use")
"""What a rank says when the rendezvous port it was given was taken between `free_port` and its bind."""


def launch(args: list[str], world_size: int = 2, timeout: float = 120, env: dict[str, str] | None = None
           ) -> list[RankResult]:
    """Run `python args...` as `world_size` ranks of one job; every rank is killed after `timeout` seconds (the
    test then fails on its return code, -9). A job whose rendezvous port was taken by another process in the
    meantime is started again on a new port (up to 3 times); any other failure is returned as it is."""
    for _ in range(3):
        results = _launch_once(args, world_size, timeout, env)
        if not any(marker in r.stderr for r in results for marker in PORT_TAKEN):
            break
    return results


def _launch_once(args: list[str], world_size: int, timeout: float, env: dict[str, str] | None) -> list[RankResult]:
    """One attempt of `launch` on a fresh port."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        rank_env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                    "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                    "OMP_NUM_THREADS": "1", "SAE_DIST_TIMEOUT": "60", "PYTHONPATH": str(ROOT),
                    **(env or {})}
        procs.append(subprocess.Popen([PYTHON, *args], cwd=ROOT, env=rank_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True))
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    os.killpg(q.pid, signal.SIGKILL)
            out, err = p.communicate()
        results.append(RankResult(p.returncode, out, err))
    return results


def _run_killed(kill_rank: int, kill_step: int | str, script: str, args: list[str]) -> None:
    """Run `script`'s CLI here; rank `kill_rank` SIGKILLs itself just after training step `kill_step`."""
    import runpy
    from training.ensemble import Ensemble
    if int(os.environ.get("RANK", "0")) == kill_rank and str(kill_step).startswith("chunk:"):
        import training.generate as generate
        write, written = generate.write_part, [0]

        def dying_write(*a, **kw):
            write(*a, **kw)
            written[0] += 1
            if written[0] == int(str(kill_step)[len("chunk:"):]):
                os.kill(os.getpid(), signal.SIGKILL)
        generate.write_part = dying_write
    elif int(os.environ.get("RANK", "0")) == kill_rank:
        step = Ensemble.step
        count = [0]

        def dying_step(self, *a, **kw):
            out = step(self, *a, **kw)
            count[0] += 1
            if count[0] == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)
            if count[0] == -kill_step:
                raise RuntimeError("injected failure")
            return out
        Ensemble.step = dying_step
    sys.argv = [script, *args]
    runpy.run_path(str(ROOT / script), run_name="__main__")


if __name__ == "__main__":
    step = sys.argv[2]
    _run_killed(int(sys.argv[1]), step if step.startswith("chunk:") else int(step), sys.argv[3], sys.argv[4:])
