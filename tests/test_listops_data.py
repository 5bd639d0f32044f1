"""Tests for htransformer.data.listops (generator, vocabulary, reader)."""

import hashlib
import json
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest

from htransformer.data import listops
from tests.scripts_helper import ROOT, child_env, load_script

SIZES = dict(num_train=300, num_val=50, num_test=50)
# Bounds with ~100 accepted trees per chunk, so that the 400 examples span
# several chunks (exercises the chunk ordering with 2 workers).
MIN_LEN, MAX_LEN = 60, 120
OPS = ("[MIN", "[MAX", "[MED", "[SM")


# --- An independent reference: parser, evaluator, the original to_string. ---


def parse(source):
  """Parses the parenthesised LRA string into (op, [args]) / int trees."""
  tokens = [t for t in source.split() if t not in ("(", ")")]
  pos = 0

  def node():
    nonlocal pos
    tok = tokens[pos]
    pos += 1
    if tok.isdigit():
      assert len(tok) == 1, tok
      return int(tok)
    assert tok in OPS, tok
    args = []
    while tokens[pos] != "]":
      args.append(node())
    pos += 1
    return (tok, args)

  tree = node()
  assert pos == len(tokens), "trailing tokens"
  return tree


def evaluate(tree):
  if isinstance(tree, int):
    return tree
  op, args = tree
  vals = [evaluate(a) for a in args]
  if op == "[MIN":
    return min(vals)
  if op == "[MAX":
    return max(vals)
  if op == "[MED":
    return int(np.median(vals))  # as the original generator
  if op == "[SM":
    return sum(vals) % 10
  raise AssertionError(op)


def to_lra_tuple(tree):
  """The original generator's binary-tuple form of a tree."""
  if isinstance(tree, int):
    return tree
  op, args = tree
  t = (op, to_lra_tuple(args[0]))
  for a in args[1:]:
    t = (t, to_lra_tuple(a))
  return (t, "]")


def lra_to_string(t):
  """The original generator's to_string (parens=True)."""
  if isinstance(t, str):
    return t
  if isinstance(t, int):
    return str(t)
  return "( " + lra_to_string(t[0]) + " " + lra_to_string(t[1]) + " )"


def tree_length(tree):
  if isinstance(tree, int):
    return 1
  return 2 + sum(tree_length(a) for a in tree[1])


def tree_depth(tree):
  if isinstance(tree, int):
    return 1
  return 1 + max(tree_depth(a) for a in tree[1])


def tree_nargs(tree):
  if isinstance(tree, int):
    return []
  out = [len(tree[1])]
  for a in tree[1]:
    out += tree_nargs(a)
  return out


def read_lines(path):
  with open(path) as f:
    return f.read().splitlines()


# --- Fixtures. ---


@pytest.fixture(scope="module")
def gen_dirs(tmp_path_factory):
  base = tmp_path_factory.mktemp("listops")
  dirs = {}
  for name, seed, workers in [("w1", 0, 1), ("w1b", 0, 1), ("w2", 0, 2),
                              ("seed1", 1, 1)]:
    d = str(base / name)
    listops.generate(d, **SIZES, seed=seed, min_length=MIN_LEN,
                     max_length=MAX_LEN, workers=workers)
    dirs[name] = d
  return dirs


def split_path(d, split):
  return os.path.join(d, f"basic_{split}.tsv")


# --- Generator. ---


def test_doc_example_string_form():
  assert lra_to_string(to_lra_tuple(("[MAX", [2, 9]))) == "( ( ( [MAX 2 ) 9 ) ] )"
  assert parse("( ( ( [MAX 2 ) 9 ) ] )") == ("[MAX", [2, 9])


def test_layout_labels_and_lengths(gen_dirs):
  d = gen_dirs["w1"]
  for split in listops.SPLITS:
    lines = read_lines(split_path(d, split))
    assert lines[0] == "Source\tTarget"
    assert len(lines) - 1 == SIZES[f"num_{split}"]
    for line in lines[1:]:
      assert line.count("\t") == 1
      source, label = line.split("\t")
      label = int(label)
      assert 0 <= label < 10
      tree = parse(source)
      # String form is exactly the original generator's to_string.
      assert lra_to_string(to_lra_tuple(tree)) == source
      assert evaluate(tree) == label, source
      n_tokens = len([t for t in source.split() if t not in ("(", ")")])
      assert n_tokens == tree_length(tree)
      assert MIN_LEN < n_tokens < MAX_LEN
      assert tree_depth(tree) <= listops.MAX_DEPTH
      assert all(2 <= k <= 10 for k in tree_nargs(tree))
  with open(os.path.join(d, listops.METADATA_FILE)) as f:
    meta = json.load(f)
  assert meta["seed"] == 0 and meta["min_length"] == MIN_LEN
  assert meta["chunks"] >= 3


def test_labels_cover_all_classes_and_med_floor(gen_dirs):
  labels = []
  saw_even_med = False
  for split in listops.SPLITS:
    for line in read_lines(split_path(gen_dirs["w1"], split))[1:]:
      source, label = line.split("\t")
      labels.append(int(label))
      tree = parse(source)
      if tree[0] == "[MED" and len(tree[1]) % 2 == 0:
        saw_even_med = True
  assert set(labels) == set(range(10))
  assert saw_even_med


def test_distinct_across_splits(gen_dirs):
  sources = []
  for split in listops.SPLITS:
    sources += [l.split("\t")[0]
                for l in read_lines(split_path(gen_dirs["w2"], split))[1:]]
  assert len(sources) == sum(SIZES.values())
  assert len(set(sources)) == len(sources)


def test_deterministic_and_independent_of_workers(gen_dirs):
  for split in listops.SPLITS:
    a = open(split_path(gen_dirs["w1"], split), "rb").read()
    b = open(split_path(gen_dirs["w1b"], split), "rb").read()
    c = open(split_path(gen_dirs["w2"], split), "rb").read()
    other = open(split_path(gen_dirs["seed1"], split), "rb").read()
    assert a == b
    assert a == c
    assert a != other


# sha256 of the files `generate` writes for seed 0 (SIZES, MIN_LEN, MAX_LEN)
# at the current GENERATOR_VERSION. The generator uses Python's own random
# and integer arithmetic only, so these hold on every platform.
_DIGESTS = {
    1: {"train": "7a45ea071e7bc3d93114589f5edd5058351ecc1d43f8de0d37fa39b70d35bdd9",
        "val": "3514e7dccc6aba31b9f3382151712b92a659545af4ade019e71fef7f5204592b",
        "test": "35a69501241a9926090952e4de1664f0d947746df2926f6209a9cfb77dc6864d"},
}


def test_generated_data_is_pinned_to_the_generator_version(gen_dirs):
  """Generated data is cached by GENERATOR_VERSION (find_data_dir's folder
  name), so a change to what the generator writes must come with a new
  version; otherwise runs would silently keep training on the old data."""
  assert listops.GENERATOR_VERSION in _DIGESTS, (
      "new GENERATOR_VERSION: add its digests to _DIGESTS")
  for split in listops.SPLITS:
    data = open(split_path(gen_dirs["w1"], split), "rb").read()
    assert (hashlib.sha256(data).hexdigest()
            == _DIGESTS[listops.GENERATOR_VERSION][split]), (
                f"the generated {split} split changed: bump "
                f"listops.GENERATOR_VERSION and add its digests")


def test_sampling_distribution():
  # A node is a digit w.p. 0.75 (the root is a digit <=> length 1; trees that
  # hit max_length are None, i.e. not digits); depth never exceeds 10.
  rand = random.Random(123).random
  n = 20000
  trees = [listops._sample_tree(rand, 0, 400) for _ in range(n)]
  frac_digit = np.mean([t is not None and t[2] == 1 for t in trees])
  assert abs(frac_digit - 0.75) < 0.02
  for t in trees[:3000]:
    if t is not None:
      tree = parse(t[0])
      assert evaluate(tree) == t[1] and tree_length(tree) == t[2]
      assert tree_depth(tree) <= 10
  # With max_depth=2 the root's children are digits: a uniform 2..10 args.
  nargs = []
  for _ in range(n):
    t = listops._sample_tree(rand, 0, 10**9, max_depth=2)
    if t[2] > 1:
      tree = parse(t[0])
      assert tree_depth(tree) == 2 and evaluate(tree) == t[1]
      nargs += tree_nargs(tree)
  assert abs(len(nargs) / n - 0.25) < 0.02
  counts = np.bincount(nargs, minlength=11)
  expected = len(nargs) / 9
  assert counts[:2].sum() == 0
  assert np.all(np.abs(counts[2:] - expected) < 0.15 * expected), counts
  # Every one of the 4 operators is used about equally often at the root.
  roots = []
  for _ in range(8000):
    t = listops._sample_tree(rand, 3, 10**9, max_depth=2)  # operator roots
    if t is not None:
      roots.append(parse(t[0])[0])
  op_counts = np.array([roots.count(op) for op in OPS])
  assert np.all(np.abs(op_counts - len(roots) / 4) < 0.15 * len(roots) / 4)


def test_early_abort_respects_max_length():
  rand = random.Random(0).random
  for _ in range(3000):
    t = listops._sample_tree(rand, 0, 30)
    if t is not None:
      assert t[2] < 30


def test_generate_rejects_bad_bounds(tmp_path):
  with pytest.raises(ValueError):
    listops.generate(str(tmp_path), 1, 1, 1, min_length=10, max_length=11)


# --- Vocabulary / encoding. ---


FIXED = "( ( ( [MAX 2 ) ( ( ( [SM 0 ) 9 ) ] ) ) ] ) [MIN [MED 1 3 4 5 6 7 8 ] foo"


def test_vocab_fixed_and_sorted():
  assert listops.VOCAB == ("<pad>", "<unk>", "0", "1", "2", "3", "4", "5", "6",
                           "7", "8", "9", "[MAX", "[MED", "[MIN", "[SM", "]")
  assert listops.VOCAB_SIZE == 17
  assert listops.PAD_ID == 0 and listops.NUM_CLASSES == 10
  assert list(listops.VOCAB[2:]) == sorted(listops.VOCAB[2:])


def test_encode_drops_parentheses():
  ids = listops.encode(FIXED)
  assert ids.dtype == np.int32
  tokens = [t for t in FIXED.split() if t not in ("(", ")")]
  assert len(ids) == len(tokens)
  assert listops.decode(ids[:-1]) == " ".join(tokens[:-1])
  assert ids[-1] == 1  # unknown "foo"
  assert listops.encode("( ( ( [MAX 2 ) 9 ) ] )").tolist() == [12, 4, 11, 16]
  assert listops.encode("<pad> ( )").tolist() == [1]


WEIRD = [
    "  ( (   [MAX 2 ) 9 )\x0b] )  ", "[MAXX [MA [S [SM ((  )) )( 12 ] ]]",
    "", " ", "(", "x", "[MIN\x1c3\x1f4 \x0c]", "[SMAX 3", "a b c d A",
    "[MAX 2 ] \u00e9", "[MIN 3 [", "M A X", "[MIN 1 2 ]\n", "1  2", "1 2 ",
    " 1 2", "[MAX[MIN 2", "E D", "]]", "<pad> <unk>",
    "0 1 2 3 4 5 6 7 8 9 ] [MAX [MED [MIN [SM ( )",
]


@pytest.mark.parametrize("text", WEIRD)
def test_encode_fast_path_matches_split(text):
  expected = [listops.VOCAB.index(t) if t in listops.VOCAB[2:] else 1
              for t in text.split() if t not in ("(", ")")]
  ids = listops.encode(text)
  assert ids.dtype == np.int32
  assert ids.tolist() == expected
  assert listops._encode_slow(text).tolist() == expected


def test_read_split_uses_fast_path_and_falls_back(gen_dirs, tmp_path,
                                                  monkeypatch):
  path = split_path(gen_dirs["w1"], "val")
  expected, labels = listops.read_split(path)

  def no_slow(*a):
    raise AssertionError("slow path used for a standard line")

  with monkeypatch.context() as m:
    m.setattr(listops, "_encode_slow", no_slow)
    seqs, _ = listops.read_split(path)
  assert all(np.array_equal(a, b) for a, b in zip(seqs, expected))
  # Odd lines (double spaces, unknown / non-ASCII tokens) take the slow path.
  odd = tmp_path / "odd.tsv"
  odd.write_text("Source\tTarget\n( [MAX  2 ) \u00e9 ] )\t3\n[SM 1 foo ]\t4\n",
                 encoding="utf-8")
  seqs, labels = listops.read_split(str(odd))
  assert [s.tolist() for s in seqs] == [[12, 4, 1, 16], [15, 3, 1, 16]]
  assert labels.tolist() == [3, 4]


def test_vocab_ids_identical_across_processes():
  code = ("from htransformer.data import listops as L; "
          "print(list(L.VOCAB)); print(L.encode(%r).tolist())" % FIXED)
  outs = []
  for hashseed in ("1", "2"):
    env = child_env(PYTHONHASHSEED=hashseed)
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                       capture_output=True, text=True, check=True)
    outs.append(r.stdout)
  assert outs[0] == outs[1]
  expected = "%s\n%s\n" % (list(listops.VOCAB), listops.encode(FIXED).tolist())
  assert outs[0] == expected


# --- Reading. ---


def test_read_split_roundtrip_and_crlf(gen_dirs, tmp_path):
  path = split_path(gen_dirs["w1"], "val")
  seqs, labels = listops.read_split(path)
  lines = read_lines(path)[1:]
  assert len(seqs) == len(labels) == len(lines)
  assert labels.dtype == np.int32
  for s, line in zip(seqs, lines):
    src, lab = line.split("\t")
    np.testing.assert_array_equal(s, listops.encode(src))
  # Official files were written by csv.writer: CRLF; extra trailing newlines.
  crlf = tmp_path / "crlf.tsv"
  crlf.write_bytes(open(path, "rb").read().replace(b"\n", b"\r\n") + b"\r\n\n")
  seqs2, labels2 = listops.read_split(str(crlf))
  np.testing.assert_array_equal(labels, labels2)
  assert all(np.array_equal(a, b) for a, b in zip(seqs, seqs2))


def test_read_split_errors(tmp_path):
  missing = str(tmp_path / "nope" / "basic_train.tsv")
  with pytest.raises(FileNotFoundError, match="nope"):
    listops.read_split(missing)
  bad = tmp_path / "bad.tsv"
  bad.write_text("( [MAX 1 ) 2\t3\n")
  with pytest.raises(ValueError, match="header"):
    listops.read_split(str(bad))


def _copy_splits(src, dst, crlf=False):
  os.makedirs(dst, exist_ok=True)
  for split in listops.SPLITS:
    data = open(split_path(src, split), "rb").read()
    if crlf:
      data = data.replace(b"\n", b"\r\n")
    with open(split_path(dst, split), "wb") as f:
      f.write(data)


def test_find_data_dir_given(gen_dirs, tmp_path):
  cache = str(tmp_path / "cache")
  # Official layout: lra_release/listops-1000/basic_*.tsv.
  release = tmp_path / "lra_release"
  official = str(release / "listops-1000")
  _copy_splits(gen_dirs["w1"], official, crlf=True)
  assert listops.find_data_dir(str(release), cache) == official
  assert listops.find_data_dir(official, cache) == official
  assert listops.find_data_dir(str(tmp_path), cache) == official
  assert not os.path.exists(cache)  # nothing generated
  src = listops.ListOpsSource(split_path(official, "test"), max_length=128)
  assert len(src) == SIZES["num_test"]

  with pytest.raises(FileNotFoundError, match="does_not_exist"):
    listops.find_data_dir(str(tmp_path / "does_not_exist"), cache)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="basic_train.tsv"):
    listops.find_data_dir(str(empty), cache)
  # Only some of the files.
  partial = tmp_path / "partial"
  partial.mkdir()
  (partial / "basic_train.tsv").write_text("Source\tTarget\n")
  with pytest.raises(FileNotFoundError, match="basic_val.tsv"):
    listops.find_data_dir(str(partial), cache)


def test_find_data_dir_generates_once(gen_dirs, tmp_path, monkeypatch):
  cache = str(tmp_path / "cache")
  kw = dict(seed=0, **SIZES, min_length=MIN_LEN, max_length=MAX_LEN, workers=1)
  d = listops.find_data_dir(None, cache, **kw)
  name = f"listops_seed0_300_50_50_60_120_v{listops.GENERATOR_VERSION}"
  assert d == os.path.join(cache, name)
  assert os.listdir(cache) == [name]  # no temp left
  for split in listops.SPLITS:
    assert (open(split_path(d, split), "rb").read()
            == open(split_path(gen_dirs["w1"], split), "rb").read())

  def fail(*a, **k):
    raise AssertionError("regenerated")

  monkeypatch.setattr(listops, "generate", fail)
  assert listops.find_data_dir("", cache, **kw) == d
  with pytest.raises(ValueError):
    listops.find_data_dir(None, "", **kw)


# --- ListOpsSource. ---


def test_source_shapes_padding_truncation(gen_dirs, tmp_path):
  path = split_path(gen_dirs["w1"], "train")
  seqs, labels = listops.read_split(path)
  lengths = np.array([len(s) for s in seqs])
  max_len = 90
  assert (lengths > max_len).any() and (lengths < max_len).any()
  src = listops.ListOpsSource(path, max_length=max_len)
  assert len(src) == len(seqs)
  np.testing.assert_array_equal(src.lengths, lengths)
  for i in range(len(src)):
    item = src[i]
    assert set(item) == {"inputs", "targets"}
    x, y = item["inputs"], item["targets"]
    assert x.shape == (max_len,) and x.dtype == np.int32
    assert np.shape(y) == () and np.asarray(y).dtype == np.int32
    assert int(y) == labels[i]
    n = min(lengths[i], max_len)
    np.testing.assert_array_equal(x[:n], seqs[i][:n])
    assert (x[n:] == listops.PAD_ID).all()
    assert (x[:n] != listops.PAD_ID).all()
  np.testing.assert_array_equal(src[-1]["inputs"], src[len(src) - 1]["inputs"])
  assert src[np.int64(3)]["targets"] == labels[3]
  with pytest.raises(IndexError):
    src[len(src)]
  # Picklable (grain worker processes) and usable as a grain source.
  src2 = pickle.loads(pickle.dumps(src))
  np.testing.assert_array_equal(src2[5]["inputs"], src[5]["inputs"])
  import grain
  ds = grain.MapDataset.source(src).batch(4)
  batch = ds[0]
  assert batch["inputs"].shape == (4, max_len)
  assert batch["targets"].shape == (4,)
  assert "ListOpsSource" in repr(src)
  # No truncation with the LRA length.
  big = listops.ListOpsSource(path, max_length=2000)
  assert big[0]["inputs"].shape == (2000,)


def test_load_sources(gen_dirs):
  srcs = listops.load_sources(gen_dirs["w1"], max_length=128)
  assert {k: len(v) for k, v in srcs.items()} == {
      "train": 300, "val": 50, "test": 50}


def test_depth_script_places_accuracy_on_the_tree(gen_dirs):
  """scripts/listops_depth.py: evaluated deep enough every expression gives
  its label; at depth 0 the answer is the root operator's most frequent
  value (root read here from the string itself)."""
  module = load_script("listops_depth")
  d = gen_dirs["w1"]
  r = module.depth_accuracies(d, max_depth=listops.MAX_DEPTH, train=200)
  assert set(r["guess"]) <= set(listops.OPERATORS)
  assert all(0 <= v <= 9 for v in r["guess"].values())
  for split in ("val", "test"):
    assert r[split][-1] == 1.0
    lo, hi = r[f"{split}_operator_depth"]
    assert 1 <= lo <= hi <= listops.MAX_DEPTH - 1
    lines = [l.split("\t") for l in read_lines(split_path(d, split))[1:]]
    root = [next(t for t in src.split() if t.startswith("[")) for src, _ in lines]
    want = np.mean([r["guess"][op] == int(y) for op, (_, y) in zip(root, lines)])
    assert r[split][0] == round(float(want), 4)
    assert r[split][0] < r[split][-1]
  with pytest.raises(ValueError, match="Not one ListOps expression"):
    module.parse("( [MAX 2 ) 9")


def _write_splits(folder, **splits):
  """basic_{split}.tsv files holding the given (source, label) rows."""
  os.makedirs(folder, exist_ok=True)
  for split, rows in splits.items():
    with open(split_path(folder, split), "w") as f:
      f.write("Source\tTarget\n")
      f.writelines(f"{src}\t{label}\n" for src, label in rows)


def test_depth_script_bad_input_is_one_line(tmp_path):
  """scripts/listops_depth.py: flags out of range, rows that are not ListOps
  expressions, an empty split and an operator the training expressions
  read lack each end in one line naming the problem (they were
  tracebacks, an empty table, or --train=-5 silently reading all but the
  last 5 training expressions)."""
  good = [("( ( ( [MAX 2 ) 9 ) ] )", 9), ("( ( ( [MIN 2 ) 9 ) ] )", 2)]
  _write_splits(tmp_path / "ok", train=good, val=good, test=good)
  bad = {"token": [("( ( ( [MAX 2 ) x ) ] )", 2)],
         "unclosed": [("( ( [MAX 2 ) 9 )", 9)],
         "extra_end": [("( ( ( [MAX 2 ) 9 ) ] ) ]", 9)],
         "no_args": [("( [MAX ] )", 0)],
         "empty": [],
         "unguessed": [("( ( ( [SM 2 ) 9 ) ] )", 1)]}
  for name, rows in bad.items():
    _write_splits(tmp_path / name, train=good, val=good, test=rows)
  cases = [(["ok", "--train=0"], "--train must be >= 1"),
           (["ok", "--train=-5"], "--train must be >= 1"),
           (["ok", "--max_depth=-1"], "--max_depth must be >= 0"),
           (["token"], "example 1: Not a ListOps token: '<unk>'"),
           (["unclosed"], "example 1: Not one ListOps expression"),
           (["extra_end"], "a ']' closes no operator"),
           (["no_args"], "a ']' closes no operator"),
           (["empty"], "basic_test.tsv: no examples"),
           (["unguessed"], "operators ['[SM'] that the first 20000")]
  procs = [(subprocess.Popen(
      [sys.executable, "scripts/listops_depth.py", str(tmp_path / args[0]),
       *args[1:]], cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True), expected)
           for args, expected in cases]
  for proc, expected in procs:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode not in (0, None), (proc.args, out)
    assert "Traceback" not in err, (proc.args, err[-3000:])
    errors = [l for l in err.splitlines() if l.startswith("Error: ")]
    assert len(errors) == 1 and expected in errors[0], (proc.args, err)
  r = load_script("listops_depth").depth_accuracies(
      str(tmp_path / "ok"), max_depth=1, train=2)
  assert r["val"] == [1.0, 1.0] and r["guess"] == {"[MAX": 9, "[MIN": 2}


def test_many_workers_finish_and_match_one(tmp_path):
  """More worker processes than cores, and chunks still queued when the
  last example is written: the generator must stop them and finish (a
  multiprocessing.Pool deadlocked in terminate() here, in about two of
  three runs with 16 workers on 2 cores, and with 64 on a GPU host: the
  data was never written), with the same files as one worker. Two seeds,
  so the old deadlock showed in ~9 of 10 runs of this test."""
  sizes = dict(num_train=300, num_val=50, num_test=50)
  for seed in (0, 1):
    many, one = str(tmp_path / f"many{seed}"), str(tmp_path / f"one{seed}")
    subprocess.run(
        [sys.executable, "-m", "htransformer.data.listops",
         f"--output_dir={many}", f"--seed={seed}", "--min_length=200",
         "--max_length=600", "--workers=16"]
        + [f"--{k}={v}" for k, v in sizes.items()],
        cwd=ROOT, check=True, timeout=120, capture_output=True)
    listops.generate(one, **sizes, seed=seed, min_length=200,
                     max_length=600, workers=1)
    for split in listops.SPLITS:
      assert (open(split_path(many, split), "rb").read()
              == open(split_path(one, split), "rb").read())
