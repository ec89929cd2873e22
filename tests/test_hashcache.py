"""The sha256 of a checkpoint is remembered while the file is unchanged, and only then."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
import safetensors.torch
import torch

from conftest import tiny_state
from modelsoup import average, open_ingredient
from modelsoup.errors import ConfigError, IngredientError
from modelsoup.formats import base as base_format
from modelsoup.formats import hashcache


def _write(tmp_path, name, seed):
    path = tmp_path / name
    safetensors.torch.save_file(tiny_state(seed), str(path))
    return path


def _card_hashes(out):
    card = json.loads(out.with_name(out.name + ".json").read_text())
    return [row["sha256"] for row in card["ingredients"]]


def test_remembered_hash_is_used_until_the_file_changes(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "sha256.jsonl"
    monkeypatch.setenv("MODELSOUP_HASH_CACHE", str(cache))
    a, b = _write(tmp_path, "a.safetensors", 0), _write(tmp_path, "b.safetensors", 1)
    true = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)]

    average([a, b]).save(tmp_path / "s1.safetensors", progress=False)
    assert _card_hashes(tmp_path / "s1.safetensors") == true
    assert len(cache.read_text().splitlines()) == 2

    # A planted (wrong) digest for a's exact identity is believed: proof the cache is read.
    hashcache.remember([a], "0" * 64, cache)
    average([a, b]).save(tmp_path / "s2.safetensors", progress=False)
    assert _card_hashes(tmp_path / "s2.safetensors") == ["0" * 64, true[1]]

    # Touching the file changes its identity: the hash is computed again, and right.
    os.utime(a)
    assert open_ingredient(a).sha256 == true[0]


def test_rewritten_file_is_hashed_again(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSOUP_HASH_CACHE", str(tmp_path / "sha256.jsonl"))
    path = _write(tmp_path, "w.safetensors", 0)
    first = open_ingredient(path).sha256
    safetensors.torch.save_file(tiny_state(5), str(path))
    second = open_ingredient(path).sha256
    assert second != first
    assert second == hashlib.sha256(path.read_bytes()).hexdigest()


def test_pickles_and_folders_are_remembered_too(tmp_path, monkeypatch):
    cache = tmp_path / "sha256.jsonl"
    monkeypatch.setenv("MODELSOUP_HASH_CACHE", str(cache))
    path = tmp_path / "w.pt"
    torch.save(tiny_state(0), path)
    digest = open_ingredient(path).sha256
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert hashcache.recall([path], cache) == digest


def test_cache_off_corrupt_or_unwritable_never_gets_in_the_way(tmp_path, monkeypatch):
    path = _write(tmp_path, "w.safetensors", 0)
    true = hashlib.sha256(path.read_bytes()).hexdigest()

    monkeypatch.setenv("MODELSOUP_HASH_CACHE", "off")
    assert open_ingredient(path).sha256 == true

    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text('{"files": 3\nnot json at all\n{"sha256": "x"}\n')
    monkeypatch.setenv("MODELSOUP_HASH_CACHE", str(corrupt))
    assert open_ingredient(path).sha256 == true
    assert hashcache.recall([path], corrupt) == true

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MODELSOUP_HASH_CACHE", str(blocker / "sha256.jsonl"))
    assert open_ingredient(path).sha256 == true


def _big_state(seed):
    gen = torch.Generator().manual_seed(seed)
    # tensors of several hash slots each, and small ones between them
    return {
        "embed": torch.randn(300, 100, generator=gen),
        "ln.bias": torch.randn(7, generator=gen),
        "proj": torch.randn(50, 210, generator=gen).half(),
        "empty": torch.zeros(0),
    }


@pytest.mark.parametrize("threads", ["0", "1"])
def test_first_contact_and_cached_cards_keep_the_full_file_sha256(tmp_path, monkeypatch, threads):
    monkeypatch.setenv("MODELSOUP_HASH_THREADS", threads)  # inline, and on a thread
    monkeypatch.setattr(base_format, "_worker", None)
    # small slots, so every tensor is hashed in many pieces that wrap around the ring
    monkeypatch.setattr(base_format._HashWorker, "SLOT", 4096)
    monkeypatch.setenv("MODELSOUP_HASH_CACHE", str(tmp_path / "sha256.jsonl"))
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"m{i}.safetensors")
        safetensors.torch.save_file(_big_state(i), str(paths[-1]))
    true = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    for name in ("first.safetensors", "cached.safetensors"):
        average(paths).save(tmp_path / name, progress=False)
        assert _card_hashes(tmp_path / name) == true
    assert len((tmp_path / "sha256.jsonl").read_text().splitlines()) == 3


def test_threaded_hashes_fed_in_turns_equal_hashlib():
    monkey_slot = base_format._HashWorker.SLOT
    chunks = [os.urandom(n) for n in (0, 1, 5000, monkey_slot + 3, 2 * monkey_slot, 77)]
    a, b = base_format.ThreadedHash(b"head-a"), base_format.ThreadedHash()
    for chunk in chunks:
        a.update(chunk)
        b.update(memoryview(chunk[::-1]))
    assert a.hexdigest() == hashlib.sha256(b"head-a" + b"".join(chunks)).hexdigest()
    assert b.hexdigest() == hashlib.sha256(b"".join(c[::-1] for c in chunks)).hexdigest()


def test_hashes_on_several_threads_keep_each_ones_order():
    worker = base_format._HashWorker(lanes=3)
    worker.SLOT = 1000
    data = [os.urandom(n) for n in (2500, 10, 4000)]
    digests = [hashlib.sha256() for _ in range(3)]
    lanes = [worker.lane() for _ in digests]
    assert len(set(lanes)) == 3
    last = []
    for _ in range(4):
        for d, lane, chunk in zip(digests, lanes, data):
            last.append(worker.feed(d, lane, memoryview(chunk)))
    for f in last:
        f.result()
    for d, chunk in zip(digests, data):
        assert d.hexdigest() == hashlib.sha256(chunk * 4).hexdigest()


def test_a_process_on_one_core_hashes_inline():
    worker = base_format._HashWorker(lanes=0)
    digest = hashlib.sha256()
    assert worker.feed(digest, worker.lane(), memoryview(b"abc")) is None
    assert digest.hexdigest() == hashlib.sha256(b"abc").hexdigest()


def test_hash_threads_are_set_by_the_environment_and_checked(monkeypatch):
    monkeypatch.setenv("MODELSOUP_HASH_THREADS", "2")
    assert len(base_format._HashWorker().lanes) == 2
    for bad in ("-1", "two", "1.5", "1000"):
        monkeypatch.setenv("MODELSOUP_HASH_THREADS", bad)
        with pytest.raises(ConfigError, match="MODELSOUP_HASH_THREADS"):
            base_format.hash_threads()


@pytest.mark.parametrize("threads", ["0", "1"])
def test_reading_every_byte_remembers_the_hash_without_a_card(tmp_path, monkeypatch, threads):
    # a recipe tasted without saving a soup reads each file once; a later run must not
    # hash it again
    monkeypatch.setenv("MODELSOUP_HASH_THREADS", threads)
    monkeypatch.setattr(base_format, "_worker", None)
    cache = tmp_path / "sha256.jsonl"
    monkeypatch.setenv("MODELSOUP_HASH_CACHE", str(cache))
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(_big_state(0), str(path))
    source = open_ingredient(path).source
    for name in source.names():
        source.tensor(name)
    for lane in base_format._hash_worker().lanes:  # the hash threads have caught up
        lane.submit(lambda: None).result()
    assert hashcache.recall([path], cache) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert open_ingredient(path).source._known == hashcache.recall([path], cache)


# A checkpoint rewritten or replaced while it is open (a training job still saving it)
# is refused: neither values nor hashes may come from two different files.
CHANGED = "changed while modelsoup was reading it"


def _replace(path, state, **kw):
    """Replace ``path`` the way trainers (and modelsoup) save: write beside, rename over."""
    tmp = path.with_name(path.name + ".new")
    if path.suffix == ".pt":
        torch.save(state, tmp)
    else:
        safetensors.torch.save_file(state, str(tmp), **kw)
    os.replace(tmp, path)


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "cached-hash"])
def test_a_safetensors_file_replaced_after_open_is_refused(tmp_path, monkeypatch, warm):
    monkeypatch.setenv("MODELSOUP_HASH_CACHE", str(tmp_path / "cache.jsonl"))
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for p in (a, b):
        safetensors.torch.save_file({"w": torch.arange(8.0)}, str(p))
    if warm:  # an earlier run remembered the old file's hash
        assert average([a, b]).ingredients[0].sha256
    soup = average([a, b])  # headers read
    # same tensor, longer header: the old offsets would land on other bytes
    _replace(a, {"w": torch.full((8,), 100.0)}, metadata={"epoch": "12"})
    with pytest.raises(IngredientError, match=CHANGED):
        soup.save(tmp_path / "soup.safetensors", progress=False)
    assert not (tmp_path / "soup.safetensors").exists()


def test_a_safetensors_file_rewritten_in_place_while_open_is_refused(tmp_path):
    path = tmp_path / "a.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(4), "v": torch.zeros(4)}, str(path))
    source = open_ingredient(path).source
    assert torch.equal(source.tensor("w"), torch.zeros(4))  # its descriptor is now open
    safetensors.torch.save_file({"w": torch.ones(4), "v": torch.ones(4)}, str(path))  # in place
    with pytest.raises(IngredientError, match=CHANGED):
        source.tensor("v")


def test_a_file_replaced_after_every_read_keeps_the_hash_of_what_was_read(tmp_path, monkeypatch):
    cache = tmp_path / "cache.jsonl"
    monkeypatch.setenv("MODELSOUP_HASH_CACHE", str(cache))
    path = tmp_path / "a.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(4)}, str(path))
    old = hashlib.sha256(path.read_bytes()).hexdigest()
    source = open_ingredient(path).source
    source.tensor("w")  # every byte read, through the open descriptor
    _replace(path, {"w": torch.ones(4)})
    assert source.fingerprint() == old
    new = hashlib.sha256(path.read_bytes()).hexdigest()
    assert open_ingredient(path).sha256 == new  # the cache did not file the old hash as new


def test_a_pickle_replaced_after_open_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSOUP_HASH_CACHE", str(tmp_path / "cache.jsonl"))
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"w": torch.zeros(4)}, a)
    torch.save({"w": torch.ones(4)}, b)
    soup = average([a, b])  # memory-mapped: the values stay the old file's
    _replace(a, {"w": torch.full((4,), 100.0)})
    with pytest.raises(IngredientError, match=CHANGED):
        soup.save(tmp_path / "soup.safetensors", progress=False)
    assert not (tmp_path / "soup.safetensors").exists()


@pytest.mark.parametrize("hashed_first", [False, True])
def test_a_pickle_rewritten_in_place_after_open_is_refused(tmp_path, monkeypatch, hashed_first):
    # torch.save onto the same path truncates the memory-mapped file: its pages change
    monkeypatch.setenv("MODELSOUP_HASH_CACHE", str(tmp_path / "cache.jsonl"))
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"w": torch.zeros(4)}, a)
    torch.save({"w": torch.ones(4)}, b)
    soup = average([a, b])
    if hashed_first:  # the card's hash is taken before the rewrite
        assert all(ing.sha256 for ing in soup.ingredients)
    time.sleep(0.01)  # a new modification time, even on coarse clocks
    torch.save({"w": torch.full((4,), 50.0)}, b)
    with pytest.raises(IngredientError, match=CHANGED):
        soup.save(tmp_path / "soup.safetensors", progress=False)
    assert not (tmp_path / "soup.safetensors").exists()
