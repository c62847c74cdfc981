"""Finding weights in the local Hub cache, without the network."""

from vis2ir.hub import cached_snapshot, is_local


def fake_cached_repo(cache, repo_id: str, files: list[str]):
    """A Hub cache entry as huggingface_hub lays it out: refs/main names a snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    for f in files:
        (snapshot / f).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / f).write_text("{}")
    return snapshot


def test_cached_snapshot_needs_every_file_and_the_weights(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # read at each call; the variable at import
    full = fake_cached_repo(tmp_path, "owner/full", ["config.json", "model.safetensors"])
    fake_cached_repo(tmp_path, "owner/noweights", ["config.json"])
    assert cached_snapshot("owner/full", ("config.json",), weights=(".",)) == full
    assert cached_snapshot("owner/noweights", ("config.json",), weights=(".",)) is None
    assert cached_snapshot("owner/noweights", ("config.json", "preprocessor_config.json")) is None
    assert cached_snapshot("owner/noweights", ("config.json",)) is not None
    assert cached_snapshot("owner/absent", ("config.json",)) is None


def test_local_paths_and_hub_ids_are_told_apart(tmp_path):
    assert is_local(str(tmp_path)) and is_local("./models/x") and is_local("a/b/c")
    assert not is_local("black-forest-labs/FLUX.1-Fill-dev")


def test_a_cached_snapshot_without_its_weights_is_an_interrupted_download(tmp_path, monkeypatch, caplog):
    """Config files but no weights (or an index whose shards are not all there) is not the model:
    online it is downloaded again (None, with a warning), offline the error says what to do."""
    import json

    import pytest

    from vis2ir import backbone as bb
    from vis2ir.errors import Vis2IRError
    from vis2ir.hub import weights_problem

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    configs = ["transformer/config.json", "vae/config.json", "model_index.json"]
    fake_cached_repo(tmp_path, "owner/flux", configs)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    patterns = ["transformer/*", "vae/*", "model_index.json"]
    assert cached_snapshot("owner/flux", tuple(configs[:2]), patterns, ("transformer", "vae")) is None
    assert "incomplete copy" in caplog.text and "interrupted download" in caplog.text
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Vis2IRError, match=r"incomplete copy \(transformer/ has no weights file, .*interrupted "
                                          r"download\): run `hf download owner/flux` again") as err:
        bb.resolve_flux_path("owner/flux", need_text=False)
    assert "\n" not in str(err.value)
    # Sharded weights: every shard the index names must be there.
    snap = fake_cached_repo(tmp_path, "owner/sharded", ["config.json", "model-00001-of-00002.safetensors"])
    (snap / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert weights_problem(snap, (".",)) == ("model-00002-of-00002.safetensors is missing (one of the 2 files "
                                             "model.safetensors.index.json names)")
    assert cached_snapshot("owner/sharded", ("config.json",), weights=(".",)) is None
    (snap / "model-00002-of-00002.safetensors").write_text("{}")
    assert cached_snapshot("owner/sharded", ("config.json",), weights=(".",)) == snap
