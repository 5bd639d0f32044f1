"""Running several training commands at once, one per GPU.

Used by scripts/sweep.py and scripts/reproduce_lra.py (``--gpus``): each
command sees only its GPU (``CUDA_VISIBLE_DEVICES``) and writes its console
to its own log file; a GPU takes the next command as soon as its command
ends. Stopped (SIGTERM, Ctrl-C), the launcher passes SIGTERM on to the
commands still running and waits for them (a training run saves its step
and exits), so none is left running on its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time


def env_with_path(root: str, **variables) -> dict[str, str]:
  """This process's environment, ``variables`` set, and ``root`` first on
  PYTHONPATH ahead of what was there: a child process imports this
  repository's code and keeps packages that come through PYTHONPATH."""
  env = dict(os.environ, **variables)
  env["PYTHONPATH"] = os.pathsep.join(
      [root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  return env


def parse_gpus(text: str) -> list[str]:
  """'0,1,2,3' -> ['0', '1', '2', '3']; '4' (a count) -> the same."""
  parts = [p.strip() for p in text.split(",") if p.strip()]
  if len(parts) == 1 and parts[0].isdigit() and "," not in text:
    count = int(parts[0])
    if count < 1:
      raise ValueError(f"--gpus={text!r} is a count of no GPUs; for GPU 0 "
                       "alone give --gpus=1 (a count) or --gpus=0, (a list).")
    return [str(i) for i in range(count)]
  if not parts or not all(p.isdigit() for p in parts):
    raise ValueError(f"--gpus={text!r} is not a count or a list of GPU "
                     "ids like 0,1,2,3.")
  if len(set(parts)) != len(parts):
    raise ValueError(f"--gpus={text!r} names a GPU twice.")
  return parts


def run_on_gpus(jobs, gpus, env=None, cwd=None, poll_s: float = 0.5
                ) -> list[str]:
  """Runs ``jobs`` ((name, command, log path) each), one per GPU at a time.

  Returns the names of the jobs that failed (non-zero exit). SIGTERM or
  an exception (Ctrl-C) stops the running jobs with SIGTERM, waits for
  them and then ends the launcher as it would have.
  """
  env = dict(os.environ if env is None else env)
  pending = list(jobs)
  running = {}  # gpu -> (name, process, log file)
  failed, done = [], 0
  terminated = []  # SIGTERM's number once received
  old_handler = None
  if threading.current_thread() is threading.main_thread():
    old_handler = signal.signal(
        signal.SIGTERM, lambda signum, frame: terminated.append(signum))
  try:
    while (pending or running) and not terminated:
      for gpu in gpus:
        if gpu not in running and pending:
          name, cmd, log_path = pending.pop(0)
          os.makedirs(os.path.dirname(os.path.abspath(log_path)),
                      exist_ok=True)
          log = open(log_path, "a")
          proc = subprocess.Popen(cmd, cwd=cwd, stdout=log,
                                  stderr=subprocess.STDOUT,
                                  env=dict(env, CUDA_VISIBLE_DEVICES=gpu))
          running[gpu] = (name, proc, log)
          print(f"[GPU {gpu}] started {name} (log: {log_path})", flush=True)
      time.sleep(poll_s)
      for gpu, (name, proc, log) in list(running.items()):
        if proc.poll() is None:
          continue
        log.close()
        del running[gpu]
        done += 1
        status = "finished" if proc.returncode == 0 else "FAILED"
        print(f"[GPU {gpu}] {status} {name} ({done}/{len(jobs)})", flush=True)
        if proc.returncode:
          failed.append(name)
  finally:
    for gpu, (name, proc, log) in running.items():
      if proc.poll() is None:
        print(f"[GPU {gpu}] stopping {name}", flush=True)
        proc.terminate()
    for _, proc, log in running.values():
      proc.wait()
      log.close()
    if old_handler is not None:
      signal.signal(signal.SIGTERM, old_handler)
  if terminated:
    signal.raise_signal(signal.SIGTERM)  # as if received now
  return failed
