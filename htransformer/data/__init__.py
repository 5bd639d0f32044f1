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
