"""A cache shared by a team: one builder at a time (the lease), reruns that succeed, the hidden
dtype chosen to fit the model, resume only on the same kind of machine."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner

from unidistill.cli import main
from unidistill.errors import CacheBusyError, CacheError, HiddenRangeError, LeaseLostError
from unidistill.storage import CacheReader
from unidistill.storage.lease import CacheLease
from unidistill.storage.layout import CacheLayout
from unidistill.storage.location import CacheLocation
from unidistill.storage.manifest import LEASE_KEY, read_manifest, read_unit_marker
from unidistill.storage.writer import CacheWriter

from .conftest import make_llama
from .test_cache_resume import assert_same_cache, build_args, run_cli, slow_build_driver
from .test_storage_backends import BUCKET, s3_server  # noqa: F401  (the moto server fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "s3":
        request.getfixturevalue("s3_server")
        return f"s3://{BUCKET}/lease-{tmp_path.name}"
    return str(tmp_path / "c")


def write_lease(root, record: dict) -> None:
    CacheLocation(root).write_json(LEASE_KEY, record)


# -- the lease ---------------------------------------------------------------------------------

def test_a_held_lease_refuses_a_second_builder_naming_the_holder(root):
    first = CacheLease(root, heartbeat_s=60).acquire()
    try:
        with pytest.raises(CacheBusyError) as e:
            CacheLease(root, heartbeat_s=60).acquire()
        msg = str(e.value)
        assert f"host {socket.gethostname()}, pid {os.getpid()}, started {first.record['started_at']}" in msg
        assert "--wait" in msg and "another --out" in msg
    finally:
        first.release()
    assert CacheLocation(root).read_bytes(LEASE_KEY) is None  # released
    CacheLease(root, heartbeat_s=60).acquire().release()  # free again


def test_a_stale_lease_is_taken_over(root):
    write_lease(root, {"host": "other-machine", "pid": 1, "started_at": "2026-01-01T00:00:00Z",
                       "token": "theirs", "heartbeat_s": 1.0})
    with pytest.raises(CacheBusyError):  # fresh: refused
        CacheLease(root, heartbeat_s=60).acquire()
    time.sleep(5.5)  # 4 heartbeats of 1 s, and S3's one-second modification times
    said = []
    lease = CacheLease(root, heartbeat_s=60, log=said.append).acquire()
    try:
        assert "taking over" in said[0] and "host other-machine" in said[0] and "no heartbeat" in said[0]
        assert json.loads(CacheLocation(root).read_bytes(LEASE_KEY))["token"] == lease.record["token"]
    finally:
        lease.release()


def test_a_dead_process_lease_on_this_host_is_taken_over_at_once(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root = str(tmp_path / "c")
    write_lease(root, {"host": socket.gethostname(), "pid": dead.pid, "started_at": "x",
                       "token": "theirs", "heartbeat_s": 60})
    said = []
    CacheLease(root, log=said.append).acquire().release()
    assert f"its process {dead.pid} no longer runs on this host" in said[0]


def test_the_heartbeat_renews_the_lease_and_a_takeover_stops_the_holder(tmp_path):
    root = str(tmp_path / "c")
    lease = CacheLease(root, heartbeat_s=0.25).acquire()
    try:
        first = CacheLocation(root).read_bytes(LEASE_KEY)
        time.sleep(1.5)  # heartbeat_at has one-second resolution
        assert CacheLocation(root).read_bytes(LEASE_KEY) != first  # rewritten: heartbeat_at moved
        lease.check()  # still ours
        write_lease(root, {"host": "thief", "pid": 7, "started_at": "y", "token": "other",
                           "heartbeat_s": 60})
        time.sleep(0.8)
        with pytest.raises(LeaseLostError, match="taken over by host thief, pid 7"):
            lease.check()
    finally:
        lease.release()
    assert json.loads(CacheLocation(root).read_bytes(LEASE_KEY))["token"] == "other"  # not ours to delete


def test_wait_takes_the_lease_once_the_holder_releases_it(tmp_path):
    root = str(tmp_path / "c")
    holder = CacheLease(root, heartbeat_s=60).acquire()
    got = []
    waiter = threading.Thread(target=lambda: got.append(CacheLease(root, heartbeat_s=60, log=got.append)
                                                        .acquire(wait=True, poll_s=0.05)))
    waiter.start()
    time.sleep(0.5)
    assert len(got) == 1 and got[0].startswith("waiting for the lease")  # waiting, not holding
    holder.release()
    waiter.join(10)
    assert isinstance(got[-1], CacheLease)
    got[-1].release()


# -- two builds at once --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_teacher_dir, text_file):
    out = tmp_path_factory.mktemp("team") / "single"
    assert run_cli(build_args(tiny_teacher_dir, text_file, out)).exit_code == 0
    return out


def start_builds(args, *extra, n=2):
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "UNIDISTILL_LEASE_HEARTBEAT": "2", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", slow_build_driver(0.3), *map(str, args), *extra],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    return [(p.wait(timeout=300), p.communicate()[1]) for p in procs]


def assert_same_as(out, reference):
    assert_same_cache(out, reference)
    assert CacheLocation(out).read_bytes(LEASE_KEY) is None


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_builds_at_once_one_builds_the_other_is_refused(where, request, tmp_path, reference,
                                                           tiny_teacher_dir, text_file):
    if where == "s3":
        request.getfixturevalue("s3_server")
    out = f"s3://{BUCKET}/two-at-once" if where == "s3" else tmp_path / "c"
    results = start_builds(build_args(tiny_teacher_dir, text_file, out))
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "is being built by another cache-build (host" in refused and "pid" in refused
    assert_same_as(out, reference)
    # one build computed every unit: all markers carry one run id
    assert len({read_unit_marker(out, u)["run_id"] for u in range(12)}) == 1


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_builds_at_once_with_wait_one_builds_the_other_finds_it_complete(
        where, request, tmp_path, reference, tiny_teacher_dir, text_file):
    if where == "s3":
        request.getfixturevalue("s3_server")
    out = f"s3://{BUCKET}/two-waiting" if where == "s3" else tmp_path / "c"
    results = start_builds(build_args(tiny_teacher_dir, text_file, out), "--wait")
    assert [code for code, _ in results] == [0, 0], results
    stderr = "".join(err for _, err in results)
    assert stderr.count("cache complete:") == 1 and stderr.count("is already complete") == 1
    assert "waiting for the lease" in stderr
    assert_same_as(out, reference)
    assert len({read_unit_marker(out, u)["run_id"] for u in range(12)}) == 1


def test_finalize_checks_every_unit_against_its_digest(tmp_path):
    """A unit whose data changed after its marker (another writer, damage) is not called
    complete: its marker is dropped so that a rerun redoes it."""
    layout = CacheLayout(n_sequences=4, seq_len=8, stored_k=4, vocab_size=100, hidden_size=8,
                         layers=(1,), shard_size=2)
    writer = CacheWriter.open(tmp_path / "c", layout, {"teacher": {"source": "a"}})
    for unit in range(2):
        writer.write_unit(unit, {name: np.zeros((2,) + tuple(spec["shape"][1:]), spec["dtype"])
                                 for name, spec in layout.array_specs().items()})
    writer.group["input_ids"][2:4] = 5  # unit 1 rewritten behind its marker
    with pytest.raises(CacheError, match=r"unit 1 \(input_ids\) differ from the digests"):
        writer.finalize()
    assert read_unit_marker(tmp_path / "c", 1) is None and read_unit_marker(tmp_path / "c", 0)
    assert read_manifest(tmp_path / "c")["status"] == "building"


def test_finalize_drops_the_marker_of_a_unit_that_no_longer_decodes(tmp_path):
    """A torn shard behind a marker (its bytes overwritten) is found at finalize like a changed
    one, through the same per-unit check as cache-verify, not left as a raw decode error."""
    layout = CacheLayout(n_sequences=4, seq_len=8, stored_k=4, vocab_size=100, hidden_size=8,
                         layers=(1,), shard_size=2)
    writer = CacheWriter.open(tmp_path / "c", layout, {"teacher": {"source": "a"}})
    for unit in range(2):
        writer.write_unit(unit, {name: np.ones((2,) + tuple(spec["shape"][1:]), spec["dtype"])
                                 for name, spec in layout.array_specs().items()})
    shard = tmp_path / "c" / "input_ids" / "c" / "1" / "0"
    shard.write_bytes(b"\x00" * shard.stat().st_size)
    with pytest.raises(CacheError, match=r"unit 1 \(input_ids\) differ from the digests"):
        writer.finalize()
    assert read_unit_marker(tmp_path / "c", 1) is None and read_unit_marker(tmp_path / "c", 0)
    assert read_manifest(tmp_path / "c")["status"] == "building"


# -- the hidden dtype ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def huge_teacher_dir(tmp_path_factory, tiny_teacher_dir):
    """The tiny teacher with its embeddings scaled so that every layer's states exceed 65504."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("huge")
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    model = make_llama(len(tok))
    model.model.embed_tokens.weight.data *= 5e6
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_auto_stores_a_float32_teacher_beyond_float16_as_bfloat16(tmp_path, huge_teacher_dir, text_file):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "c"
    result = run_cli(build_args(huge_teacher_dir, text_file, out))
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["layout"]["hidden_dtype"] == "bfloat16"
    assert "calibration batch peak" in manifest["build"]["hidden_dtype_choice"]
    reader = CacheReader(out)
    got = reader.layout.hidden_codec.to_torch(reader.read(0)["hidden"][1]).float()
    ids = torch.as_tensor(np.asarray(reader.group["input_ids"][0:1]), dtype=torch.long)
    model = AutoModelForCausalLM.from_pretrained(huge_teacher_dir)
    with torch.no_grad():
        want = model(ids, output_hidden_states=True).hidden_states[1][0]
    assert want.abs().max() > 65504
    torch.testing.assert_close(got, want, rtol=2 ** -7, atol=0)
    # the resolved dtype is what is compared: asked for explicitly, the cache is already complete
    again = run_cli(build_args(huge_teacher_dir, text_file, out, "--hidden-dtype", "bfloat16"))
    assert again.exit_code == 0 and "already complete" in again.output


@pytest.mark.parametrize("dtype, expected", [("float32", "float16"), ("bfloat16", "bfloat16")])
def test_auto_follows_the_teachers_own_dtype(tmp_path, tiny_teacher_dir, text_file, dtype, expected):
    out = tmp_path / "c"
    assert run_cli(build_args(tiny_teacher_dir, text_file, out, "--dtype", dtype,
                              "--max-sequences", "4")).exit_code == 0
    assert read_manifest(out)["layout"]["hidden_dtype"] == expected


def test_overflow_gives_the_command_that_fixes_it_and_leaves_nothing_behind(tmp_path, huge_teacher_dir,
                                                                           text_file):
    out = tmp_path / "c"
    result = CliRunner().invoke(main, build_args(huge_teacher_dir, text_file, out, "--hidden-dtype", "float16"))
    assert result.exit_code == 2
    command = result.output[result.output.index("unidistill cache-build"):].split("\n")[0]
    assert "--hidden-dtype bfloat16" in command and "--overwrite" not in command
    assert CacheLocation(out).is_empty()  # nothing committed, nothing left that blocks a rerun
    rerun = run_cli(shlex.split(command)[1:])
    assert rerun.exit_code == 0, rerun.output
    assert read_manifest(out)["layout"]["hidden_dtype"] == "bfloat16"


def test_overflow_after_committed_units_asks_for_overwrite():
    from unidistill.cache_builder.config import BuildConfig
    from unidistill.cache_builder.guard import with_rerun_command

    class Writer:
        def committed_units(self):
            return {0}

    cfg = BuildConfig(teacher="t", data="builtin:pydoc_topics", out="/tmp/x y", hidden_dtype="float16",
                      top_k=8)
    error = with_rerun_command(HiddenRangeError("layer 2 reaches 1e5"), cfg, Writer())
    assert isinstance(error, HiddenRangeError)
    assert str(error).endswith("unidistill cache-build --teacher t --data builtin:pydoc_topics "
                               "--out '/tmp/x y' --top-k 8 --hidden-dtype bfloat16 --overwrite")


# -- idempotent reruns and the machine of a resume -------------------------------------------------

def unfinish(out, unit: int, **compute) -> None:
    """Make a complete cache look interrupted (status building, ``unit`` uncommitted), with
    ``compute`` settings changed as if it had been started on another machine."""
    meta = json.loads((out / "zarr.json").read_text())
    manifest = meta["attributes"]["unidistill"]
    manifest["status"] = "building"
    manifest["settings"]["compute"].update(compute)
    (out / "zarr.json").write_text(json.dumps(meta))
    os.remove(out / "_units" / f"{unit:06d}.json")


@pytest.mark.parametrize("compute, option, named", [
    ({}, ("--batch-size", "1"), "settings.compute.batch_size: 2 in the cache, 1 now"),
    ({"device": "cuda:NVIDIA H100 80GB HBM3"}, (),
     "settings.compute.device: 'cuda:NVIDIA H100 80GB HBM3' in the cache, 'cpu' now"),
])
def test_resume_on_another_kind_of_machine_is_refused_naming_the_consequence(
        tmp_path, reference, tiny_teacher_dir, text_file, compute, option, named):
    import shutil

    out = tmp_path / "c"
    shutil.copytree(reference, out)
    unfinish(out, 3, **compute)
    result = CliRunner().invoke(main, build_args(tiny_teacher_dir, text_file, out, *option))
    assert result.exit_code == 2
    assert named in result.output
    assert "the resumed units would not be identical to an uninterrupted build" in result.output
    assert read_unit_marker(out, 3) is None  # nothing written


def test_the_machine_is_recorded_and_a_complete_cache_is_complete_on_any_machine(
        tmp_path, reference, tiny_teacher_dir, text_file):
    compute = read_manifest(reference)["settings"]["compute"]
    assert compute == {"device": "cpu", "batch_size": 2, "forward_dtype": "float32"}
    result = run_cli(build_args(tiny_teacher_dir, text_file, reference, "--batch-size", "1"))
    assert result.exit_code == 0 and "already complete" in result.output
