"""Data of the tasks: one module per task (see htransformer/tasks.py)."""


def check_nonempty(sizes: dict, what: str, where) -> None:
  """Raises ValueError if a split has none of ``what``, naming where each
  empty split came from (``where(split)``: its file or folder) and every
  split's size. ``sizes``: {split: count, or None for a missing split}."""
  empty = [s for s, n in sizes.items() if not n]
  if empty:
    places = ", ".join(dict.fromkeys(where(s) for s in empty))
    listed = ", ".join(f"{s} {'missing' if n is None else n}"
                       for s, n in sizes.items())
    raise ValueError(f"{places}: the {'/'.join(empty)} split(s) have no "
                     f"{what} (split sizes: {listed}); every split needs at "
                     "least one.")


def check_seed(value, name: str) -> int:
  """``value`` as an int if it is a non-negative integer (what numpy's
  generators take); else ValueError naming the setting ``name``. Checked
  where the setting is read, not where numpy would refuse it later (in a
  reader thread, say)."""
  if int(value) != value or value < 0:
    raise ValueError(f"{name} must be a non-negative integer, got "
                     f"{value!r}.")
  return int(value)


def ignore_interrupts() -> None:
  """Initializer of the data worker processes: Ctrl-C goes to the parent
  alone, which stops the pool, instead of every worker printing its own
  traceback."""
  import signal  # pylint: disable=g-import-not-at-top
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def check_output_dir(path: str, flag: str = "--output_dir") -> None:
  """ValueError naming ``flag`` if ``path`` exists and is not a folder."""
  import os  # pylint: disable=g-import-not-at-top
  if not path:
    raise ValueError(f"{flag} must name a folder.")
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"{flag} {path} is a file, not a folder.")
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f"{flag} {path} lies under {parent}, a file.")


def run_cli(main, argv) -> None:
  """Runs a data generator's ``main(argv)``, answering bad arguments and
  unwritable folders with one line (``Error: ...``, exit 1) and Ctrl-C
  with another (exit 130), not a traceback."""
  import sys  # pylint: disable=g-import-not-at-top
  try:
    main(argv)
  except (ValueError, OSError) as e:
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    print("Interrupted before the data was complete: run the command "
          "again (it starts over).", file=sys.stderr)
    sys.exit(130)


def first_process() -> bool:
  """Whether this is process 0 of the run, the one that says what the data
  is (once, not once per process)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0
