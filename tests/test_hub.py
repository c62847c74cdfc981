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
    assert cached_snapshot("owner/full", ("config.json",), any_of=("*.safetensors", "*.bin")) == full
    assert cached_snapshot("owner/noweights", ("config.json",), any_of=("*.safetensors", "*.bin")) is None
    assert cached_snapshot("owner/noweights", ("config.json", "preprocessor_config.json")) is None
    assert cached_snapshot("owner/noweights", ("config.json",)) is not None
    assert cached_snapshot("owner/absent", ("config.json",)) is None


def test_local_paths_and_hub_ids_are_told_apart(tmp_path):
    assert is_local(str(tmp_path)) and is_local("./models/x") and is_local("a/b/c")
    assert not is_local("black-forest-labs/FLUX.1-Fill-dev")
