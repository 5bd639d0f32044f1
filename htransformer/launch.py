"""Running training commands: one after another, or one per GPU at once.

Used by scripts/sweep.py and scripts/reproduce_lra.py. ``run_in_turn``
runs them one at a time on this process's console; ``run_on_gpus``
(``--gpus``) runs one per GPU, each seeing only its GPU
(``CUDA_VISIBLE_DEVICES``) and writing its console to its own log file; a
GPU takes the next command as soon as its command ends. Stopped (SIGTERM,
Ctrl-C), either passes SIGTERM on to the commands still running, waits for
them (a training run saves its step and exits), starts no more and then
ends as the signal asks, so no run is left going on its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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


class _Stopper:
  """While in its ``with`` block, SIGTERM (main thread only) is recorded
  and passed on to the processes in ``self.running`` instead of ending
  this process; on leaving, the processes still running get SIGTERM and
  are waited for, and a SIGTERM that came is raised again."""

  def __init__(self):
    self.running = []  # processes a SIGTERM goes on to
    self.terminated = False
    self._old = None

  def _on_term(self, signum, frame):
    del signum, frame
    self.terminated = True
    self.stop()

  def stop(self):
    for proc in self.running:
      if proc.poll() is None:
        proc.terminate()

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._on_term)
    return self

  def __exit__(self, *exc):
    self.stop()
    for proc in self.running:
      proc.wait()
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)
    if self.terminated:
      signal.raise_signal(signal.SIGTERM)  # as if received now
    return False


def run_in_turn(jobs, env=None, cwd=None) -> list[str]:
  """Runs ``jobs`` ((name, command) each) one after another, their output
  on this console, and returns the names of those that failed (non-zero
  exit). SIGTERM or Ctrl-C stops the running one with SIGTERM and starts
  no more (``_Stopper``)."""
  failed = []
  with _Stopper() as stopper:
    for i, (name, cmd) in enumerate(jobs):
      if stopper.terminated:
        break
      print(f"[{i + 1}/{len(jobs)}] {name}", flush=True)
      proc = subprocess.Popen(cmd, cwd=cwd, env=env)
      stopper.running[:] = [proc]
      if stopper.terminated:  # came before the process was listed
        proc.terminate()
      if proc.wait() and not stopper.terminated:
        failed.append(name)
        print(f"Run {name} failed.", file=sys.stderr, flush=True)
  return failed


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
  with _Stopper() as stopper:
    try:
      while (pending or running) and not stopper.terminated:
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
            stopper.running.append(proc)
            if stopper.terminated:  # came before the process was listed
              proc.terminate()
            print(f"[GPU {gpu}] started {name} (log: {log_path})",
                  flush=True)
        time.sleep(poll_s)
        for gpu, (name, proc, log) in list(running.items()):
          if proc.poll() is None:
            continue
          log.close()
          del running[gpu]
          stopper.running.remove(proc)
          done += 1
          status = "finished" if proc.returncode == 0 else "FAILED"
          print(f"[GPU {gpu}] {status} {name} ({done}/{len(jobs)})",
                flush=True)
          if proc.returncode:
            failed.append(name)
    finally:
      for gpu, (name, proc, log) in running.items():
        if proc.poll() is None:
          print(f"[GPU {gpu}] stopping {name}", flush=True)
        log.close()  # the process keeps its own handle
  return failed
