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
