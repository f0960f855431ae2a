"""Hub ids in from_pretrained and the CLIs, read from a cache built here in huggingface_hub's own
layout (models--org--name/refs/main + snapshots/<commit>/); HF_HUB_OFFLINE=1 throughout, nothing
touches the network. The online path is checked with a stand-in snapshot_download."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from reference import TINY  # noqa: E402

from segformer_jax import SegformerConfig, SegformerForSemanticSegmentation  # noqa: E402
from segformer_jax.models.config import ConfigError  # noqa: E402
from segformer_jax.pretrained import HubError, from_pretrained, init_variables, save_pretrained  # noqa: E402

REPO = "tiny-org/segformer-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _tiny(seed=0):
    model = SegformerForSemanticSegmentation(SegformerConfig(num_labels=3, **TINY))
    return model, init_variables(model, seed)


def _put_in_cache(cache, repo, model_dir, commit=COMMIT):
    """The layout snapshot_download writes: refs/main names the commit, snapshots/<commit>/ the files
    (plain copies here; the hub uses symlinks into blobs/, which read the same)."""
    storage = os.path.join(cache, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(storage, "refs"), exist_ok=True)
    with open(os.path.join(storage, "refs", "main"), "w") as f:
        f.write(commit)
    shutil.copytree(model_dir, os.path.join(storage, "snapshots", commit))
    return os.path.join(storage, "snapshots", commit)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    model, variables = _tiny()
    local = save_pretrained(model, variables, str(root / "local"), format="hf")
    cache = str(root / "cache")
    _put_in_cache(cache, REPO, local)
    return {"cache": cache, "local": local, "variables": variables}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def _same(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_hub_id_loads_offline_from_the_cache_like_the_local_directory(hub_cache):
    t = time.perf_counter()
    _, local_vars = from_pretrained(hub_cache["local"])
    t_local = time.perf_counter() - t
    t = time.perf_counter()
    model, hub_vars = from_pretrained(REPO, cache_dir=hub_cache["cache"])
    t_hub = time.perf_counter() - t
    assert _same(hub_vars, local_vars) and _same(hub_vars["params"], hub_cache["variables"]["params"])
    assert model.config.num_labels == 3
    # No network attempt (a refused or timed-out request costs seconds to tens of seconds). Not tighter:
    # under `-n 2` beside a compiling worker the same cached load took 1.9 s once against 0.4 s locally.
    assert t_hub - t_local < 5.0, (t_hub, t_local)
    # revision= (the commit itself), local_files_only=True without the env var, HF_HUB_CACHE from the env
    _, by_commit = from_pretrained(REPO, cache_dir=hub_cache["cache"], revision=COMMIT)
    assert _same(by_commit, local_vars)


def test_hf_hub_cache_env_and_local_files_only(hub_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_HUB_CACHE", hub_cache["cache"])
    _, variables = from_pretrained(REPO, local_files_only=True)
    assert _same(variables["params"], hub_cache["variables"]["params"])


def test_a_local_path_wins_over_the_hub_id(hub_cache, tmp_path, monkeypatch):
    other_model, other_vars = _tiny(seed=1)
    monkeypatch.chdir(tmp_path)
    save_pretrained(other_model, other_vars, REPO, format="hf")  # ./tiny-org/segformer-tiny
    _, variables = from_pretrained(REPO, cache_dir=hub_cache["cache"])
    assert _same(variables["params"], other_vars["params"])


def test_offline_and_not_cached_names_the_cache(tmp_path):
    empty = str(tmp_path / "empty-cache")
    with pytest.raises(HubError, match="not in the Hugging Face cache .*empty-cache.*HF_HUB_OFFLINE=1"):
        from_pretrained("nvidia/segformer-b9-does-not-exist", cache_dir=empty)
    with pytest.raises(HubError, match="local_files_only=True"):
        from_pretrained("nvidia/segformer-b9-does-not-exist", cache_dir=empty, local_files_only=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):  # a path, not an id: no Hub look-up
        from_pretrained(str(tmp_path / "missing" / "dir"))


def test_a_cached_repo_that_is_not_a_segformer_is_refused(hub_cache, tmp_path):
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    cache = str(tmp_path / "cache")
    _put_in_cache(cache, "google/vit-tiny", str(vit))
    with pytest.raises(ConfigError, match="google/vit-tiny is not a SegFormer: .*model_type 'vit'"):
        from_pretrained("google/vit-tiny", cache_dir=cache)


def test_online_reads_config_then_safetensors_and_bin_only_without_safetensors(hub_cache, tmp_path, monkeypatch):
    """A stand-in for snapshot_download (no network): records the patterns asked for."""
    import huggingface_hub
    from huggingface_hub import errors

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls, repo_files = [], {"dir": hub_cache["local"]}
    snapshot = str(tmp_path / "snap")
    os.makedirs(snapshot)

    def fake(repo_id, *, revision, cache_dir, token, local_files_only, allow_patterns):
        calls.append((repo_id, revision, token, local_files_only, tuple(allow_patterns)))
        if repo_id == "gated/model":
            raise errors.GatedRepoError("403 gated", response=_response(403))
        if repo_id == "no/such-model":
            raise errors.RepositoryNotFoundError("404", response=_response(404))
        for name in os.listdir(repo_files["dir"]):
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                shutil.copy(os.path.join(repo_files["dir"], name), snapshot)
        return snapshot

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    _, variables = from_pretrained(REPO, revision="v1", token="hf_x")
    assert _same(variables["params"], hub_cache["variables"]["params"])
    assert [c[4][0] for c in calls] == ["config.json", "model.safetensors"]  # no .bin asked for
    assert all(c[1:4] == ("v1", "hf_x", False) for c in calls)

    calls.clear()
    shutil.rmtree(snapshot)
    os.makedirs(snapshot)
    repo_files["dir"] = str(tmp_path / "config-only")
    os.makedirs(repo_files["dir"])
    shutil.copy(os.path.join(hub_cache["local"], "config.json"), repo_files["dir"])
    with pytest.raises(Exception, match="no weights"):  # the stand-in repo has no .bin either
        from_pretrained(REPO)
    assert [c[4][0] for c in calls] == ["config.json", "model.safetensors", "pytorch_model.bin"]

    with pytest.raises(HubError, match="gated repository.*token"):
        from_pretrained("gated/model")
    with pytest.raises(HubError, match="no such model on the Hugging Face Hub"):
        from_pretrained("no/such-model")


def _response(status):
    import httpx2

    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))


def test_clis_take_hub_ids(hub_cache, tmp_path, monkeypatch, capsys):
    from PIL import Image

    import weights_convert.__main__ as wc
    from segformer_jax import predict

    monkeypatch.setenv("HF_HUB_CACHE", hub_cache["cache"])
    out = str(tmp_path / "flax")
    assert wc.main(["to-flax", REPO, out]) == 0
    _, variables = from_pretrained(out)
    assert _same(variables["params"], hub_cache["variables"]["params"])
    assert wc.main(["to-flax", "nobody/nothing", str(tmp_path / "x")]) == 2
    assert "not in the Hugging Face cache" in capsys.readouterr().err and not os.path.exists(tmp_path / "x")

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
    argv = ["--model", REPO, "--output", str(tmp_path / "pred"), "--scale", "64x64", "--quiet", str(tmp_path / "a.png")]
    assert predict.main(argv) == 0
    assert os.listdir(tmp_path / "pred")
    capsys.readouterr()
    # Without flags, the cached snapshot's preprocessor_config.json sets the defaults (its own size here).
    argv = ["--model", REPO, "--output", str(tmp_path / "pred2"), "--quiet", str(tmp_path / "a.png")]
    assert predict.main(argv) == 0
    assert "preprocessor_config.json: mode whole, scale None" in capsys.readouterr().err

    from segformer_jax.training.state import build_model

    config = ml_collections.ConfigDict({"seed": 0, "model": {"dtype": "float32", "init_from": REPO, "variant": "b0"}})
    model, variables = build_model(config, ["a", "b", "c"])
    assert _same(variables["params"], hub_cache["variables"]["params"])
