"""Streaming loader: splitting, determinism, mixing, exact resume in a fresh process, bad input."""

from __future__ import annotations

import json
import operator
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from webdataset import TarWriter

from data.loader import (
    LoaderError,
    MixedStream,
    ResumableLoader,
    ShardStream,
    StreamDataset,
    build_stream,
    expand_source,
    raw_collate,
)

REPO = Path(__file__).resolve().parents[1]


def write_shards(out: Path, prefix: str, n_shards: int, per_shard: int, drop_json: set[str] = frozenset(),
                 bad_json: set[str] = frozenset()) -> list[str]:
    """Real WebDataset tars: KEY.json + KEY.img0.jpg per sample; keys are '{prefix}{shard}_{i}'."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        path = out / f"{prefix}-{s:06d}.tar"
        with TarWriter(str(path), encoder=False) as w:
            for i in range(per_shard):
                key = f"{prefix}{s}_{i:03d}"
                sample = {"__key__": key, "img0.jpg": key.encode() * 20}
                if key in bad_json:
                    sample["json"] = b"{not json"
                elif key not in drop_json:
                    sample["json"] = json.dumps({"task": "caption", "lang": "en", "images": ["img0.jpg"],
                                                 "source": prefix, "caption": f"cap {key}"}).encode()
                w.write(sample)
        paths.append(str(path))
    return paths


def all_keys(prefix: str, n_shards: int, per_shard: int) -> set[str]:
    return {f"{prefix}{s}_{i:03d}" for s in range(n_shards) for i in range(per_shard)}


def take_keys(stream, n: int) -> list:
    """Next n keys of a stream, None once it is exhausted."""
    return [s.key if s is not None else None for s in (next(stream, None) for _ in range(n))]


def take(it, n: int) -> list:
    out = []
    for _ in range(n):
        out.append(next(it))
    return out


# --------------------------------------------------------------------------------------- sources


def test_expand_source_brace_dir_manifest(tmp_path):
    paths = write_shards(tmp_path / "d", "a", 3, 2)
    assert expand_source(str(tmp_path / "d" / "a-{000000..000002}.tar")) == paths
    assert expand_source(tmp_path / "d") == paths  # no manifest: sorted *.tar
    manifest = {"shards": [{"name": "a-000002.tar", "n_samples": 2}, {"name": "a-000000.tar", "n_samples": 2}]}
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(manifest))
    want = [paths[2], paths[0]]
    assert expand_source(tmp_path / "d") == want
    assert expand_source(str(tmp_path / "d" / "manifest.json")) == want
    assert expand_source([paths[1], str(tmp_path / "d" / "a-{000000..000001}.tar")]) == [paths[1]] + paths[:2]
    with pytest.raises(LoaderError, match="no manifest.json and no"):
        expand_source(tmp_path)


def test_sample_content_and_reference(tmp_path):
    write_shards(tmp_path, "a", 1, 3)
    s = next(ShardStream(str(tmp_path / "a-000000.tar"), name="cap", shuffle_shards=False))
    assert (s.key, s.source, s.index, s.url) == ("a0_000", "cap", 0, str(tmp_path / "a-000000.tar"))
    assert s.meta["caption"] == "cap a0_000" and s.files == {"img0.jpg": b"a0_000" * 20}


# ----------------------------------------------------------------------------------- determinism


def test_deterministic_for_seed_and_reshuffled_per_epoch(tmp_path):
    write_shards(tmp_path, "a", 5, 8)
    spec = str(tmp_path / "a-{000000..000004}.tar")

    def run(seed):
        st = ShardStream(spec, seed=seed, epochs=2, buffer_size=6)
        return [(st.epoch, s.key) for s in st]

    a, b, c = run(3), run(3), run(4)
    assert a == b
    assert a != c
    e0 = [k for e, k in a if e == 0]
    e1 = [k for e, k in a if e == 1]
    assert sorted(e0) == sorted(e1) == sorted(all_keys("a", 5, 8))
    assert e0 != e1  # reshuffled per epoch
    # the shuffle buffer really mixes shards: the first 8 samples do not all come from one shard
    assert len({k.split("_")[0] for k in e0[:8]}) > 1
    # no buffer + no shard shuffle = plain file order
    plain = [s.key for s in ShardStream(spec, shuffle_shards=False)]
    assert plain == sorted(all_keys("a", 5, 8))


# ------------------------------------------------------------------------------------- splitting


@pytest.mark.parametrize("n_shards", [9, 3])  # 9 >= 4 consumers: shard split; 3 < 4: sample striding
def test_epochs_cover_every_sample_once_2_ranks_x_2_workers(tmp_path, n_shards):
    write_shards(tmp_path, "a", n_shards, 7)
    spec = str(tmp_path / f"a-{{000000..{n_shards - 1:06d}}}.tar")
    per_epoch: dict[int, list[str]] = {0: [], 1: []}
    for rank in range(2):
        for worker in range(2):
            st = ShardStream(spec, seed=11, epochs=2, buffer_size=4, rank=rank, world_size=2, worker=worker,
                             num_workers=2)
            got = [(st.epoch, s.key) for s in st]
            assert got, f"consumer rank {rank} worker {worker} got nothing"
            for e, k in got:
                per_epoch[e].append(k)
    want = all_keys("a", n_shards, 7)
    for e in (0, 1):
        assert len(per_epoch[e]) == len(want), Counter(per_epoch[e]).most_common(3)
        assert set(per_epoch[e]) == want


def test_dataloader_workers_split_like_direct_consumers(tmp_path):
    write_shards(tmp_path, "a", 6, 4)
    spec = str(tmp_path / "a-{000000..000005}.tar")
    seen = []
    for rank in range(2):
        ds = StreamDataset(spec, seed=5, epochs=1, buffer_size=3, rank=rank, world_size=2)
        dl = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=raw_collate)
        got = [s.key for batch in dl for s in batch]
        direct = [s.key for w in range(2) for s in ShardStream(spec, seed=5, buffer_size=3, rank=rank,
                                                               world_size=2, worker=w, num_workers=2)]
        assert sorted(got) == sorted(direct)
        seen += got
    assert sorted(seen) == sorted(all_keys("a", 6, 4))


# ---------------------------------------------------------------------------------------- mixing


def test_mixing_ratios_and_independent_cycling(tmp_path):
    srcs = [{"name": n, "shards": str(tmp_path / n / f"{n}-{{000000..000001}}.tar"), "weight": w}
            for n, w in (("cap", 0.6), ("vqa", 0.3), ("ocr", 0.1))]
    for n in ("cap", "vqa", "ocr"):
        write_shards(tmp_path / n, n, 2, 10)
    mix = build_stream(srcs, seed=7, buffer_size=5)
    assert isinstance(mix, MixedStream)
    draws = take(mix, 2000)
    by_source = Counter(s.source for s in draws)
    assert by_source == mix.counts
    for name, w in (("cap", 0.6), ("vqa", 0.3), ("ocr", 0.1)):
        # binomial sd <= 0.011 at n=2000; 0.04 is ~3.6 sd
        assert abs(by_source[name] / 2000 - w) < 0.04, by_source
        assert abs(mix.realised()[name] - w) < 0.04
        assert all(s.key.startswith(name) for s in draws if s.source == name)
    # each source cycles on its own: 'cap' (20 samples) ran through many epochs, every sample seen
    cap = mix.streams[0]
    assert cap.epoch >= 50
    assert {s.key for s in draws if s.source == "cap"} == all_keys("cap", 2, 10)
    assert [s.key for s in take(build_stream(srcs, seed=7, buffer_size=5), 300)] == [s.key for s in draws[:300]]
    assert [s.key for s in take(build_stream(srcs, seed=8, buffer_size=5), 300)] != [s.key for s in draws[:300]]


def test_mixing_rejects_finite_sources_and_bad_weights(tmp_path):
    write_shards(tmp_path, "a", 1, 2)
    write_shards(tmp_path, "b", 1, 2)
    a = ShardStream(str(tmp_path / "a-000000.tar"), name="a", epochs=1)
    b = ShardStream(str(tmp_path / "b-000000.tar"), name="b", epochs=None)
    with pytest.raises(LoaderError, match="infinite"):
        MixedStream([a, b], [1, 1])
    a.epochs = None
    with pytest.raises(LoaderError, match="weights"):
        MixedStream([a, b], [1, -1])


# ---------------------------------------------------------------------------------------- resume

# Runs in a FRESH interpreter: rebuild each case's loader, load the saved state, print the next keys.
_RESUME_CHILD = """
import json, operator, sys
from data.loader import ResumableLoader, build_stream
out = []
for case in json.load(open(sys.argv[1])):
    stream = build_stream(**case["build"])
    it = ResumableLoader(stream, operator.attrgetter("key")) if case["loader"] else stream
    it.load_state_dict(json.load(open(case["state"])))
    gen = iter(it)
    keys = []
    for _ in range(case["m"]):
        k = next(gen, None)
        keys.append(k if case["loader"] or k is None else k.key)
    out.append(keys)
print(json.dumps(out))
"""


def test_resume_in_fresh_process_is_exact(tmp_path):
    for n in ("cap", "vqa", "ocr"):
        write_shards(tmp_path / n, n, 3, 6)
    one = str(tmp_path / "cap" / "cap-{000000..000002}.tar")
    mixed = [{"name": n, "shards": str(tmp_path / n / f"{n}-{{000000..000002}}.tar"), "weight": w}
             for n, w in (("cap", 0.5), ("vqa", 0.3), ("ocr", 0.2))]
    # (build kwargs, use ResumableLoader?, N consumed before the checkpoint, M compared after)
    cases = [
        (dict(sources=one, seed=1, epochs=3, buffer_size=5), False, 7, 20),  # mid-shard, buffer full
        (dict(sources=one, seed=1, epochs=3, buffer_size=5), False, 16, 10),  # epoch 0 draining buffer
        (dict(sources=one, seed=1, epochs=3, buffer_size=5), False, 18, 10),  # exactly at the epoch boundary
        (dict(sources=one, seed=1, epochs=2, buffer_size=5), False, 30, 10),  # near the end: then exhausted
        (dict(sources=one, seed=2, epochs=None, buffer_size=4, rank=1, world_size=2), False, 13, 25),
        (dict(sources=mixed, seed=3, buffer_size=4), False, 37, 60),  # mixing, sources in several epochs
        (dict(sources=mixed, seed=3, buffer_size=4), True, 41, 30),  # trainer helper with prefetching workers
    ]
    child_cases, expected = [], []
    for i, (build, loader, n, m) in enumerate(cases):
        ref = take_keys(build_stream(**build), n + m)
        if loader:
            with ResumableLoader(build_stream(**build), operator.attrgetter("key"), num_workers=2,
                                 prefetch=3) as rl:
                gen = iter(rl)
                first = take(gen, n)
                state = rl.state_dict()
            assert len(state["pending"]) > 0  # prefetched but not handed out: must be replayed
            assert sum(state["delivered"].values()) == n
        else:
            st = build_stream(**build)
            first = [s.key for s in take(st, n)]
            state = st.state_dict()
        assert first == ref[:n]
        # json-serialisable and torch.save(weights_only)-able
        path = tmp_path / f"state{i}.json"
        path.write_text(json.dumps(state))
        torch.save(state, tmp_path / f"state{i}.pt")
        assert torch.load(tmp_path / f"state{i}.pt", weights_only=True) == json.loads(path.read_text())
        child_cases.append({"build": build, "loader": loader, "state": str(path), "m": m})
        expected.append(ref[n:])
    (tmp_path / "cases.json").write_text(json.dumps(child_cases))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _RESUME_CHILD, str(tmp_path / "cases.json")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for (build, loader, n, _), g, e in zip(cases, got, expected):
        assert g == e, f"resume mismatch for {build} loader={loader} N={n}"
    assert expected[3][-1] is None  # the near-end case really ran past the end of its 2 epochs


def test_resume_reopens_current_shard_without_replaying_earlier_ones(tmp_path, monkeypatch):
    import data.loader as L

    write_shards(tmp_path, "a", 4, 10)
    spec = str(tmp_path / "a-{000000..000003}.tar")
    st = ShardStream(spec, seed=0, shuffle_shards=False)
    take(st, 25)  # shard 2, offset 5
    state = st.state_dict()
    assert (state["shard_pos"], state["offset"], state["buffer"]) == (2, 5, [])
    opened = []
    real = L._Shard.__init__

    def spy(self, url):
        opened.append(os.path.basename(url))
        real(self, url)

    monkeypatch.setattr(L._Shard, "__init__", spy)
    fresh = ShardStream(spec, seed=0, shuffle_shards=False)
    fresh.load_state_dict(state)
    assert next(fresh).key == "a2_005"
    assert opened == ["a-000002.tar"]


def test_load_state_rejects_different_config(tmp_path):
    write_shards(tmp_path, "a", 2, 3)
    spec = str(tmp_path / "a-{000000..000001}.tar")
    state = ShardStream(spec, seed=1).state_dict()
    with pytest.raises(LoaderError, match="seed"):
        ShardStream(spec, seed=2).load_state_dict(state)


# ------------------------------------------------------------------------------------- bad input


def _bad_corpus(tmp_path: Path) -> str:
    write_shards(tmp_path, "a", 3, 6, drop_json={"a0_002", "a1_001"}, bad_json={"a1_004"})
    truncated = tmp_path / "a-000002.tar"
    data = truncated.read_bytes()
    # cut inside the 4th sample (TarWriter members are pax header + data + header + data = 2048 bytes,
    # image before json, so one sample is 4096 bytes)
    truncated.write_bytes(data[: 3 * 4096 + 700])
    return str(tmp_path / "a-{000000..000002}.tar")


def test_bad_input_skipped_and_counted(tmp_path, caplog):
    spec = _bad_corpus(tmp_path)
    st = ShardStream(spec, seed=0, buffer_size=3)
    with caplog.at_level("WARNING", logger="data.loader"):
        keys = sorted(s.key for s in st)
    want = (all_keys("a", 2, 6) - {"a0_002", "a1_001", "a1_004"}) | {"a2_000", "a2_001", "a2_002"}
    assert keys == sorted(want)
    assert st.skipped == {"missing_json": 2, "bad_json": 1, "truncated_tar": 1}
    logged = [r.getMessage() for r in caplog.records]
    assert sum("missing_json" in m for m in logged) == 1  # logged once per reason, counted every time
    assert any("a-000002.tar" in m and "truncated_tar" in m for m in logged)
    # the same counts come back through the trainer helper, plus what its map stage rejects
    rl = ResumableLoader(ShardStream(spec, seed=0), lambda s: None if s.key.endswith("0") else s.key)
    assert sorted(rl) == sorted(k for k in want if not k.endswith("0"))
    assert rl.skipped == {**st.skipped, "map_rejected": 3}
    assert sum(rl.delivered.values()) == len(want) - 3


def test_truncated_at_member_boundary_and_unreadable_shard(tmp_path):
    write_shards(tmp_path, "a", 2, 4)
    p = tmp_path / "a-000001.tar"
    p.write_bytes(p.read_bytes()[: 2 * 4096 + 2048])  # ends right after a1_002's image: its json is lost
    (tmp_path / "a-000002.tar").write_bytes(b"this is not a tar file" * 40)
    st = ShardStream(str(tmp_path / "a-{000000..000002}.tar"), shuffle_shards=False)
    assert [s.key for s in st] == ["a0_000", "a0_001", "a0_002", "a0_003", "a1_000", "a1_001"]
    assert st.skipped == {"truncated_tar": 1, "missing_json": 1, "unreadable_shard": 1}


def test_strict_raises_with_shard_and_member(tmp_path):
    spec = _bad_corpus(tmp_path)
    with pytest.raises(LoaderError, match=r"a-000000\.tar: member a0_002\.json: missing_json"):
        list(ShardStream(spec, shuffle_shards=False, strict=True))
    with pytest.raises(LoaderError, match=r"a-000002\.tar: member .*truncated_tar"):
        list(ShardStream(str(tmp_path / "a-000002.tar"), strict=True))


def test_cut_inside_member_data_drops_that_sample(tmp_path):
    write_shards(tmp_path, "a", 1, 3)
    p = tmp_path / "a-000000.tar"
    p.write_bytes(p.read_bytes()[: 4096 + 2048 + 1536 + 3])  # a0_001's json data cut after 3 bytes
    st = ShardStream(str(p))
    assert [s.key for s in st] == ["a0_000"]
    assert st.skipped == {"unreadable_member": 1, "truncated_tar": 1}
