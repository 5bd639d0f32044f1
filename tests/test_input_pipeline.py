"""grain pipeline: seeded shuffling, epochs, resumable iterator, eval batches."""

import json
import pickle
import re

import numpy as np
import pytest

from htransformer import input_pipeline


class Source:
  """A real random-access source: example i has inputs [i, i, i] + label."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"inputs": np.full(3, i, np.int32), "targets": np.int32(i % 10)}


def ids(batch):
  return batch["inputs"][:, 0].tolist()


def take(it, k):
  return [ids(next(it)) for _ in range(k)]


def test_each_epoch_is_a_permutation_and_epochs_differ():
  it = input_pipeline.train_iterator(Source(20), global_batch_size=5, seed=0)
  epoch1 = sum(take(it, 4), [])
  epoch2 = sum(take(it, 4), [])
  assert sorted(epoch1) == list(range(20)) == sorted(epoch2)
  assert epoch1 != list(range(20))  # shuffled
  assert epoch1 != epoch2  # reshuffled every epoch


def test_order_is_fixed_by_the_seed():
  a = take(input_pipeline.train_iterator(Source(50), 8, seed=1), 10)
  b = take(input_pipeline.train_iterator(Source(50), 8, seed=1), 10)
  c = take(input_pipeline.train_iterator(Source(50), 8, seed=2), 10)
  assert a == b and a != c


def test_iterator_state_resumes_exactly():
  it = input_pipeline.train_iterator(Source(30), 4, seed=3)
  take(it, 9)  # crosses an epoch boundary
  state = it.get_state()
  expected = take(it, 12)
  fresh = input_pipeline.train_iterator(Source(30), 4, seed=3)
  fresh.set_state(state)
  assert take(fresh, 12) == expected


def test_batches_have_static_shapes():
  it = input_pipeline.train_iterator(Source(7), 4, seed=0)
  for _ in range(5):
    b = next(it)
    assert b["inputs"].shape == (4, 3) and b["targets"].shape == (4,)


def test_eval_batches_cover_every_example_once():
  batches = list(input_pipeline.eval_batches(Source(23), 10))
  assert len(batches) == 3
  seen = [i for b in batches for i, w in zip(ids(b), b["weights"]) if w > 0]
  assert seen == list(range(23))
  assert batches[-1]["weights"].tolist() == [1.0] * 3 + [0.0] * 7
  assert all(b["inputs"].shape == (10, 3) for b in batches)


class TokenWeightedSource(Source):
  """Rows with per-token weights, as the language model's: example i
  weighs its first i % 3 + 1 tokens."""

  def __getitem__(self, i):
    item = super().__getitem__(i)
    item["weights"] = (np.arange(3) <= i % 3).astype(np.float32)
    return item


def test_eval_batches_keep_per_token_weights_and_zero_the_padding():
  """Per-token weights pass through, and the padding rows of the last
  batch (copies of example 0) weigh 0 on every token: the weights add up
  to the split's tokens."""
  source = TokenWeightedSource(23)
  batches = list(input_pipeline.eval_batches(source, 10))
  rows = [(i, w) for b in batches for i, w in zip(ids(b), b["weights"])]
  for i, w in rows[:23]:
    np.testing.assert_array_equal(w, source[i]["weights"])
  assert batches[-1]["weights"][3:].sum() == 0
  assert sum(b["weights"].sum() for b in batches) == sum(
      i % 3 + 1 for i in range(23))


class BatchedSource(Source):
  """The same examples, with the batched read the image sources offer."""

  def __init__(self, n):
    super().__init__(n)
    self.batched_reads = 0

  def get_batch(self, indices):
    self.batched_reads += 1
    indices = np.asarray(indices)
    return {"inputs": np.repeat(indices[:, None], 3, 1).astype(np.int32),
            "targets": (indices % 10).astype(np.int32)}


def test_batched_reads_give_the_same_batches():
  src = BatchedSource(23)
  a = take(input_pipeline.train_iterator(Source(23), 5, seed=4), 14)
  b = take(input_pipeline.train_iterator(src, 5, seed=4), 14)
  assert a == b
  assert src.batched_reads >= 14


def test_batches_cross_epochs_without_losing_examples():
  # 23 examples in batches of 5: the stream is epoch after epoch, each a
  # permutation, and batch 4 holds the end of epoch 0 and epoch 1's start.
  stream = sum(take(input_pipeline.train_iterator(Source(23), 5, seed=0),
                    23), [])
  for e in range(5):
    assert sorted(stream[23 * e:23 * (e + 1)]) == list(range(23))
  assert stream[:23] != stream[23:46]


def test_per_process_batches_interleave():
  ds = input_pipeline.ShuffledBatches(Source(40), 4, seed=2)
  everything = [ids(ds[b]) for b in range(6)]
  for p in (0, 1):
    mine = ds[p::2]
    assert [ids(mine[i]) for i in range(3)] == everything[p::2]


def test_dataset_pickles_for_worker_processes():
  ds = input_pipeline.ShuffledBatches(Source(13), 4, seed=5)
  want = [ids(ds[b]) for b in range(8)]
  copy = pickle.loads(pickle.dumps(ds))
  assert [ids(copy[b]) for b in range(8)] == want


def test_state_records_the_order_and_restores():
  it = input_pipeline.train_iterator(Source(30), 4, seed=3)
  take(it, 5)
  state = it.get_state()
  assert state == {"next_index": 5, "data_seed": 3, "global_batch_size": 4,
                   "num_examples": 30}
  expected = take(it, 6)
  fresh = input_pipeline.train_iterator(Source(30), 4, seed=3)
  fresh.set_state(json.loads(json.dumps(state)))  # as the checkpoint has it
  assert take(fresh, 6) == expected
  # A state saved before the order was recorded restores as before.
  old = input_pipeline.train_iterator(Source(30), 4, seed=3)
  old.set_state({"next_index": 5})
  assert take(old, 6) == expected
  assert old.get_state()["next_index"] == 11


@pytest.mark.parametrize("n,batch,seed,changed", [
    (30, 4, 4, "config.data_seed: 3 in the checkpoint, now 4"),
    (30, 6, 3, "config.batch_size: 4 in the checkpoint, now 6"),
    (31, 4, 3, "the number of training examples: 30 in the checkpoint, "
               "now 31"),
])
def test_resuming_with_another_data_order_is_refused(n, batch, seed, changed):
  it = input_pipeline.train_iterator(Source(30), 4, seed=3)
  take(it, 5)
  state = it.get_state()
  other = input_pipeline.train_iterator(Source(n), batch, seed=seed)
  with pytest.raises(ValueError, match=re.escape(changed)):
    other.set_state(state)


def test_resuming_reports_every_change():
  it = input_pipeline.train_iterator(Source(30), 4, seed=3)
  state = it.get_state()
  other = input_pipeline.train_iterator(Source(12), 6, seed=0)
  with pytest.raises(ValueError) as e:
    other.set_state(state)
  assert all(f in str(e.value) for f in ("data_seed: 3", "batch_size: 4",
                                         "examples: 30"))

