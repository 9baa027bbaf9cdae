"""Hub access through a real Hub-compatible server on 127.0.0.1 (olah + a write API, see hub_server.py).

Every download goes through the real huggingface_hub client; the tests check which files reached the
cache (an encoder-only load never fetches W_dec_*), revisions, sub-folders, hf:// lists into other
repos, offline mode, describe/compatibility checks without weights, push_to_hub round trips, the CLI,
and the errors for bad input.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import random_transcoder, textbook_dense
from format_fixtures import write_gemma_scope
from hub_server import HubServer, cleanup, olah_python

from sparse_clt_hf import (
    CrossLayerTranscoder,
    IncompatibleTranscoderError,
    TranscoderFormatError,
    cli,
    registry,
)
from sparse_clt_hf.hub import (
    HubAccessError,
    HubSource,
    LocalSource,
    check_before_download,
    describe,
    open_source,
    parse_hub_ref,
    read_safetensors_header,
)

pytestmark = pytest.mark.hub
D = 32


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def tcs():
    """The transcoders served by the test Hub."""
    return {
        "clt": random_transcoder(d=D, layers=(0, 1, 2), activation="jumprelu", decoders=True, seed=1),
        "clt_v2": random_transcoder(d=D, layers=(0, 1, 2), decoders=True, seed=2),
        "plt": random_transcoder(d=D, layers=(0, 1), widths=[48, 40], decoders=True, span=1, seed=3),
    }


def _saved(tc: CrossLayerTranscoder, model_name: str | None = None) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="tc-"))
    if model_name:
        tc.config.model_name = model_name
    tc.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def hub(tcs):
    python, why = olah_python()
    if python is None:
        pytest.skip(f"olah (the local Hub server) is not available: {why}")
    root = Path(tempfile.mkdtemp(prefix="hub-server-"))
    server = HubServer(root, python).start()
    try:
        server.v1 = server.add_folder("org/clt", _saved(tcs["clt"], "tiny-llama"))
        server.tag("org/clt", "v1")
        server.dev = server.add_folder("org/clt", _saved(tcs["clt_v2"], "tiny-llama-dev"), revision="dev")
        server.add_folder("org/plt-sub", _saved(tcs["plt"], "tiny-llama"), subfolder="tc/plt")
        plt_sha = server.commit_files("org/plt-sub", {"README.md": b"# a repo with a transcoder in tc/plt\n"})
        pointer = {
            "model_name": "tiny-llama",
            "model_kind": "transcoder_set",
            "feature_input_hook": "hook_resid_mid",
            "feature_output_hook": "hook_mlp_out",
            "transcoders": [
                f"hf://org/plt-sub/tc/plt/layer_{i}.safetensors?revision={plt_sha}" for i in (0, 1)
            ],
        }
        server.commit_files("org/pointer", {"config.yaml": yaml.safe_dump(pointer).encode()})
        broken = _saved(tcs["clt"], "tiny-llama")
        (broken / "W_enc_0.safetensors").write_bytes(b"\xff" * 4000)  # corrupt header
        state = {k.replace("_1", "_x"): v for k, v in _read(broken / "W_enc_1.safetensors").items()}
        _write(broken / "W_enc_1.safetensors", state)  # wrong tensor names
        state = _read(broken / "W_enc_2.safetensors")
        state["b_enc_2"] = torch.zeros(7)
        _write(broken / "W_enc_2.safetensors", state)  # wrong shape
        server.add_folder("org/broken", broken)
        server.commit_files("org/unknown", {"weights.bin": b"\0" * 300, "notes.txt": b"not a transcoder\n"})
        gs = Path(tempfile.mkdtemp(prefix="gs-"))
        server.gemma_scope = write_gemma_scope(gs, [0, 1], D, 48)
        gs_sha = server.add_folder("google/gs-test", gs)
        gs_pointer = {
            "model_name": "google/gemma-2-2b",
            "model_kind": "transcoder_set",
            "feature_input_hook": "ln2.hook_normalized",
            "feature_output_hook": "hook_mlp_out",
            "transcoders": [
                f"hf://google/gs-test/layer_{i}/width_16k/average_l0_50/params.npz?revision={gs_sha}"
                for i in (0, 1)
            ],
        }
        server.commit_files("org/gs-pointer", {"config.yaml": yaml.safe_dump(gs_pointer).encode()})
        gs_dev = Path(tempfile.mkdtemp(prefix="gs-dev-"))
        write_gemma_scope(gs_dev, [0, 1], D, 24, seed=5)
        server.add_folder("google/gs-test", gs_dev, revision="dev")
        server.gs_local = {"google/gs-test": gs}
        for repo, deflate in (("google/gs-wide", False), ("google/gs-wide-deflated", True)):
            wide = Path(tempfile.mkdtemp(prefix="gs-wide-"))  # 1 MB per params.npz: headers are a few KB
            write_gemma_scope(wide, [0, 1], D, 4096, seed=4)
            if deflate:  # np.savez_compressed: every member ZIP_DEFLATED
                for f in wide.rglob("params.npz"):
                    with np.load(f) as z:
                        arrays = dict(z)
                    np.savez_compressed(f, **arrays)
            server.gs_local[repo] = wide
            server.add_folder(repo, wide)
        yield server
    finally:
        server.stop()
        cleanup(root)


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))


@pytest.fixture
def env(hub, tmp_path, monkeypatch):
    """Point huggingface_hub at the test server, online, with a fresh cache folder per test.

    Setting HF_ENDPOINT after huggingface_hub was imported is not enough for every version (0.34 builds
    commit URLs from ``constants.ENDPOINT``; download URLs come from ``HUGGINGFACE_CO_URL_TEMPLATE``),
    so the constants derived from it at import time are patched too, as if it had been set before.
    """
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    template = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    # huggingface_hub < 1.0 binds the template into file_download at import; transformers imports it early.
    import huggingface_hub.file_download as file_download

    if hasattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE"):
        monkeypatch.setattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return tmp_path / "hf-cache"


def cached_files(cache: Path, repo_id: str) -> set[str]:
    """Files present in the snapshot folders of ``repo_id`` in an HF cache (what was downloaded)."""
    snaps = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return {p.relative_to(s).as_posix() for s in snaps.glob("*") for p in s.rglob("*") if p.is_file()}


def assert_same_encoders(a: CrossLayerTranscoder, b: CrossLayerTranscoder, layers) -> None:
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(0))
    for layer in layers:
        torch.testing.assert_close(
            a.encode(x, layer).double(), textbook_dense(b, x, layer), atol=1e-5, rtol=1e-5
        )


# ---------------------------------------------------------------------------- references, registry (no server)
@pytest.mark.parametrize(
    "ref,expected",
    [
        ("org/repo", ("org/repo", "", None)),
        ("org/repo/sub/dir", ("org/repo", "sub/dir", None)),
        ("org/repo@v1.0", ("org/repo", "", "v1.0")),
        ("org/repo/sub@refs/pr/3", ("org/repo", "sub", "refs/pr/3")),
        ("hf://org/repo/a/b.safetensors?revision=abc123", ("org/repo", "a/b.safetensors", "abc123")),
        ("hf://org/repo", ("org/repo", "", None)),
        ("not-a-repo", None),
    ],
)
def test_parse_hub_ref(ref, expected):
    got = parse_hub_ref(ref)
    assert (None if got is None else (got.repo_id, got.path, got.revision)) == expected


def test_open_source_kinds(tmp_path):
    assert isinstance(open_source(tmp_path), LocalSource)
    src = open_source("clt-llama-3.2-1b-524k")
    assert isinstance(src, HubSource) and src.repo.repo_id == "mntss/clt-llama-3.2-1b-524k"
    assert src.format_hint == "circuit_tracer"
    assert open_source("org/repo/sub@dev").name == "org/repo/sub@dev"
    assert open_source("org/repo@dev", revision="v2").repo.revision == "v2"
    with pytest.raises(TranscoderFormatError, match="registry name"):
        open_source("no-such-thing")
    with pytest.raises(TranscoderFormatError, match="not a folder"):
        open_source(str(tmp_path / "missing"))


# Facts copied from /work/shared/FORMATS.md, independent of configs/*.yaml.
PUBLISHED = {
    "mntss/clt-gemma-2-2b-426k": dict(kind="clt", n_layers=26, d_model=2304, width=16384, site="resid_mid"),
    "mntss/clt-gemma-2-2b-2.5M": dict(kind="clt", width=98304),
    "mntss/clt-llama-3.2-1b-524k": dict(
        kind="clt", n_layers=16, d_model=2048, width=32768, activation="jumprelu"
    ),
    "mntss/transcoder-Llama-3.2-1B": dict(kind="plt", width=131072),
    "mwhanna/qwen3-14b-transcoders-lowl0": dict(kind="plt", width=163840, site="mlp_in"),
    "facebook/crv-8b-instruct-transcoders": dict(kind="plt", activation="topk", k=128),
    "mntss/gemma-scope-transcoders": dict(kind="plt"),
    "google/gemma-scope-2b-pt-transcoders": dict(format="gemma_scope", input_transform="rmsnorm"),
    "mwhanna/qwen3-0.6b-transcoders-lowl0": dict(kind="plt"),
    "mwhanna/qwen3-1.7b-transcoders-lowl0": dict(kind="plt"),
    "mwhanna/qwen3-4b-transcoders": dict(kind="plt"),
    "mwhanna/qwen3-8b-transcoders": dict(kind="plt"),
}


def test_registry_matches_published_facts():
    by_repo = {e.repo_id: e for e in registry.entries().values()}
    assert set(PUBLISHED) <= set(by_repo)
    for repo, facts in PUBLISHED.items():
        entry = by_repo[repo]
        for key, value in facts.items():
            assert getattr(entry, key) == value, (repo, key)
        assert entry.format in ("circuit_tracer", "gemma_scope")
    assert registry.get_entry("CLT-GEMMA-2-2B-426K").repo_id == "mntss/clt-gemma-2-2b-426k"


def test_registry_env_override(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text("my-clt: {repo_id: me/clt, revision: v3, subfolder: a/b}\n")
    monkeypatch.setenv(registry.ENV_VAR, str(tmp_path))
    assert registry.get_entry("my-clt").reference == "me/clt/a/b@v3"
    src = open_source("my-clt")
    assert (src.repo.repo_id, src.subfolder, src.repo.revision) == ("me/clt", "a/b", "v3")


def test_read_safetensors_header_rejects_garbage(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(TranscoderFormatError, match="not a safetensors file"):
        read_safetensors_header(bad)


# ---------------------------------------------------------------------------- downloads
def test_encoder_only_load_downloads_no_decoder(env, tcs):
    tc = CrossLayerTranscoder.from_pretrained("org/clt", layers=[1], cache_dir=env)
    assert tc.layers == [1] and tc.config.activation == "jumprelu"
    assert cached_files(env, "org/clt") == {"config.yaml", "W_enc_1.safetensors"}
    assert_same_encoders(tc, tcs["clt"], [1])


def test_decoders_downloaded_when_asked(env, tcs):
    tc = CrossLayerTranscoder.from_pretrained("org/clt", decoders=True, cache_dir=env)
    assert {f for f in cached_files(env, "org/clt") if f.startswith("W_dec_")} == {
        f"W_dec_{i}.safetensors" for i in range(3)
    }
    for i in range(3):
        torch.testing.assert_close(tc.encoder(i).W_dec, tcs["clt"].encoder(i).W_dec)


def test_revisions_tag_branch_and_kwarg(env, hub, tcs):
    assert (
        CrossLayerTranscoder.from_pretrained("org/clt@v1", layers=[0], cache_dir=env).config.model_name
        == "tiny-llama"
    )
    dev = CrossLayerTranscoder.from_pretrained("org/clt@dev", layers=[0], cache_dir=env)
    assert dev.config.model_name == "tiny-llama-dev" and dev.config.activation == "relu"
    assert_same_encoders(dev, tcs["clt_v2"], [0])
    by_kwarg = CrossLayerTranscoder.from_pretrained("org/clt", revision=hub.dev, layers=[0], cache_dir=env)
    assert by_kwarg.config.model_name == "tiny-llama-dev"


def test_subfolder_plt_with_skip_and_decoders(env, tcs):
    tc = CrossLayerTranscoder.from_pretrained("org/plt-sub/tc/plt", decoders=True, cache_dir=env)
    assert tc.config.is_plt and tc.config.n_features == [48, 40]
    assert_same_encoders(tc, tcs["plt"], [0, 1])
    assert "README.md" not in cached_files(env, "org/plt-sub")


def test_hf_uri_list_into_other_repo(env, hub, tcs):
    tc = CrossLayerTranscoder.from_pretrained("org/pointer", layers=[1], cache_dir=env)
    assert_same_encoders(tc, tcs["plt"], [1])
    assert cached_files(env, "org/plt-sub") == {"tc/plt/layer_1.safetensors"}
    start = len(hub.requests)
    CrossLayerTranscoder.from_pretrained("org/pointer", cache_dir=env)
    listings = [p for _, p in hub.requests[start:] if p.startswith("/api/models/org/plt-sub/tree/")]
    assert len(listings) == 1  # the URIs of one config share one listing of the repo they point into


def test_hub_config_may_not_name_local_paths_or_leave_its_repo(env, hub, tcs, tmp_path):
    """A Hub repo's config.yaml that lists an absolute local path (a real, loadable file here) or escapes
    the repo with ``..`` is refused before anything is opened; paths inside the repo are followed."""
    local = _saved(tcs["plt"]) / "layer_0.safetensors"
    base = {"model_kind": "transcoder_set", "feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out"}
    for name, uri in (("abs", str(local)), ("up", "../../etc/layer_0.safetensors")):
        hub.commit_files(f"org/escape-{name}", {"config.yaml": yaml.safe_dump({**base, "transcoders": [uri]}).encode()})
        with pytest.raises(TranscoderFormatError, match="may only name files of the same repo or hf:// URIs"):
            CrossLayerTranscoder.from_pretrained(f"org/escape-{name}", cache_dir=env)
    hub.add_folder("org/inside", local.parent, subfolder="files")
    inside = {**base, "transcoders": [f"files/../files/layer_{i}.safetensors" for i in (0, 1)]}
    hub.commit_files("org/inside", {"config.yaml": yaml.safe_dump(inside).encode()})
    tc = CrossLayerTranscoder.from_pretrained("org/inside", layers=[1], cache_dir=env)
    assert_same_encoders(tc, tcs["plt"], [1])


def test_offline_mode_with_warm_cache(env, tcs, monkeypatch):
    from huggingface_hub import constants

    CrossLayerTranscoder.from_pretrained("org/clt", layers=[0, 1], cache_dir=env)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    dead = "http://127.0.0.1:9"  # nothing listens: any request would fail
    monkeypatch.setenv("HF_ENDPOINT", dead)
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}"
    )
    tc = CrossLayerTranscoder.from_pretrained("org/clt", layers=[1], cache_dir=env)
    assert_same_encoders(tc, tcs["clt"], [1])
    with pytest.raises(TranscoderFormatError, match=r"no weights for layers \[2\]"):
        CrossLayerTranscoder.from_pretrained("org/clt", layers=[2], cache_dir=env)
    with pytest.raises(HubAccessError, match="not in the local Hub cache"):
        CrossLayerTranscoder.from_pretrained("org/clt@dev", cache_dir=env)


def test_local_files_only(env, tcs):
    with pytest.raises(HubAccessError, match="local_files_only"):
        CrossLayerTranscoder.from_pretrained("org/clt", layers=[0], cache_dir=env, local_files_only=True)
    CrossLayerTranscoder.from_pretrained("org/clt", layers=[0], cache_dir=env)
    tc = CrossLayerTranscoder.from_pretrained("org/clt", layers=[0], cache_dir=env, local_files_only=True)
    assert_same_encoders(tc, tcs["clt"], [0])


# ---------------------------------------------------------------------------- describe / compatibility
def test_describe_reads_headers_only(env):
    desc = describe(open_source("org/clt", cache_dir=env))
    assert (desc.kind, desc.layers, desc.n_features, desc.d_model) == ("clt", [0, 1, 2], [64] * 3, D)
    assert (desc.activation, desc.input_site, desc.dtype, desc.model_name) == (
        "jumprelu",
        "resid_mid",
        "float32",
        "tiny-llama",
    )
    assert desc.has_decoders and desc.decoder_bytes > desc.encoder_bytes > 0
    assert cached_files(env, "org/clt") == {"config.yaml"}


def test_describe_plt_via_uri_list(env):
    desc = describe(open_source("org/pointer", cache_dir=env))
    assert (desc.kind, desc.layers, desc.n_features, desc.d_model) == ("plt", [0, 1], [48, 40], D)
    assert cached_files(env, "org/plt-sub") == set()


def _tiny_llama(hidden: int = D, layers: int = 3, name: str = "org/tiny-llama"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(cfg)
    model.config.name_or_path = name
    return model


def test_check_before_download(env, recwarn):
    src = open_source("org/clt", cache_dir=env)
    check_before_download(src, _tiny_llama())
    assert not [w for w in recwarn if "trained on" in str(w.message)]
    with pytest.raises(IncompatibleTranscoderError, match="hidden size 48"):
        check_before_download(src, _tiny_llama(hidden=48))
    with pytest.raises(IncompatibleTranscoderError, match=r"layers \[2\] are out of range"):
        check_before_download(src, _tiny_llama(layers=2))
    check_before_download(src, _tiny_llama(layers=2), layers=[0, 1])
    with pytest.raises(IncompatibleTranscoderError, match=r"no encoders for layers \[5\]"):
        check_before_download(src, _tiny_llama(), layers=[5])
    with pytest.warns(UserWarning, match="trained on 'tiny-llama'"):
        check_before_download(src, _tiny_llama(name="org/qwen-other"))
    assert cached_files(env, "org/clt") == {"config.yaml"}


def test_other_format_via_hub_describe_and_load(env, hub):
    desc = describe(open_source("google/gs-test", cache_dir=env))
    assert (desc.format, desc.layers, desc.n_features, desc.d_model) == ("gemma_scope", [0, 1], [48, 48], D)
    assert desc.input_site == "resid_mid" and desc.activation == "jumprelu"
    assert cached_files(env, "google/gs-test") == set()  # npz headers by range requests, nothing downloaded
    tc = CrossLayerTranscoder.from_pretrained("google/gs-test", layers=[1], cache_dir=env)
    torch.testing.assert_close(tc.encoder(1).W_enc, torch.from_numpy(hub.gemma_scope[1]["W_enc"]).T)
    assert cached_files(env, "google/gs-test") == {"layer_1/width_16k/average_l0_50/params.npz"}


def _same_summary(a, b) -> bool:
    return dataclasses.replace(a, name="") == dataclasses.replace(b, name="")


@pytest.mark.parametrize("repo", ["google/gs-wide", "google/gs-wide-deflated"])
def test_gemma_scope_describe_reads_npz_headers_by_range_requests(env, hub, monkeypatch, capsys, cli_main, repo):
    """describe / inspect of a Gemma Scope 1 repo download no params.npz: the zip directory and .npy headers
    of the requested layer's file come by HTTP range requests (stored and deflated members alike)."""
    reads: list[tuple[str, int]] = []
    get_range = HubSource._get_range

    def counted(self, full, start, length):
        data = get_range(self, full, start, length)
        reads.append((full, len(data or b"")))
        return data

    def no_npz(self, path):
        assert not path.endswith(".npz"), f"describe downloaded {path}"
        return fetch(self, path)

    fetch = HubSource.fetch
    monkeypatch.setattr(HubSource, "_get_range", counted)
    monkeypatch.setattr(HubSource, "fetch", no_npz)
    file = "layer_1/width_16k/average_l0_50/params.npz"
    size = (hub.gs_local[repo] / file).stat().st_size
    desc = describe(open_source(repo, cache_dir=env), layers=[1])
    assert _same_summary(desc, describe(LocalSource(hub.gs_local[repo]), layers=[1]))
    assert (desc.layers, desc.n_features, desc.d_model, desc.dtype) == ([1], [4096], D, "float32")
    assert {f for f, _ in reads} == {file}  # only the requested layer's file
    assert 0 < sum(n for _, n in reads) < size / 20, (sum(n for _, n in reads), size)
    every = describe(open_source(repo, cache_dir=env))
    assert _same_summary(every, describe(LocalSource(hub.gs_local[repo])))
    capsys.readouterr()
    assert cli_main(["inspect", repo, "--json", "--cache-dir", str(env)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["layers"], info["n_features"]) == ("gemma_scope", [0, 1], [4096, 4096])
    assert cached_files(env, repo) == set()
    monkeypatch.setattr(HubSource, "fetch", fetch)
    tc = CrossLayerTranscoder.from_pretrained(repo, layers=[1], cache_dir=env)
    with np.load(hub.gs_local[repo] / file) as z:
        torch.testing.assert_close(tc.encoder(1).W_enc, torch.from_numpy(z["W_enc"]).T)
    assert cached_files(env, repo) == {file}


def test_gemma_scope_describe_honours_endpoint_revision_and_token(env, hub, monkeypatch):
    """The range requests go to the source's endpoint and revision, with its token."""
    import huggingface_hub
    import huggingface_hub.utils as hf_utils

    urls, tokens = [], []
    hf_hub_url, build_hf_headers = huggingface_hub.hf_hub_url, hf_utils.build_hf_headers

    def url_spy(repo_id, filename, **kw):
        urls.append((repo_id, filename, kw.get("revision"), kw.get("endpoint")))
        return hf_hub_url(repo_id, filename, **kw)

    def headers_spy(token=None, **kw):
        tokens.append(token)
        return build_hf_headers(token=token, **kw)

    monkeypatch.setattr(huggingface_hub, "hf_hub_url", url_spy)
    monkeypatch.setattr(hf_utils, "build_hf_headers", headers_spy)
    src = HubSource("google/gs-test", revision="dev", token="hf_other_token", cache_dir=env, endpoint=hub.url)
    desc = describe(src, layers=[0])
    assert (desc.layers, desc.n_features) == ([0], [24])  # the dev branch's width, not main's 48
    assert urls and set(urls) == {("google/gs-test", "layer_0/width_16k/average_l0_50/params.npz", "dev", hub.url)}
    assert set(tokens) == {"hf_other_token"}
    assert cached_files(env, "google/gs-test") == set()


def test_uri_list_into_npz_files(env, hub):
    desc = describe(open_source("org/gs-pointer", cache_dir=env))
    assert (desc.kind, desc.layers, desc.n_features, desc.d_model) == ("plt", [0, 1], [48, 48], D)
    assert desc.input_transform == "rmsnorm"
    assert cached_files(env, "google/gs-test") == set()  # npz headers by range requests
    tc = CrossLayerTranscoder.from_pretrained("org/gs-pointer", layers=[1], cache_dir=env)
    torch.testing.assert_close(tc.encoder(1).W_enc, torch.from_numpy(hub.gemma_scope[1]["W_enc"]).T)


# ---------------------------------------------------------------------------- errors
def test_missing_repo_and_revision(env):
    with pytest.raises(HubAccessError, match="'org/nope'.*not found"):
        CrossLayerTranscoder.from_pretrained("org/nope", cache_dir=env)
    with pytest.raises(HubAccessError, match="revision 'no-such-branch'"):
        CrossLayerTranscoder.from_pretrained("org/clt@no-such-branch", cache_dir=env)


def test_missing_layer_and_file(env):
    with pytest.raises(TranscoderFormatError, match=r"no weights for layers \[7\].*layers \[0, 1, 2\]"):
        CrossLayerTranscoder.from_pretrained("org/clt", layers=[7], cache_dir=env)
    with pytest.raises(TranscoderFormatError, match="missing file 'W_enc_9.safetensors'"):
        open_source("org/clt", cache_dir=env).fetch("W_enc_9.safetensors")


@pytest.mark.parametrize(
    "layer,message",
    [
        (0, "W_enc_0.safetensors: not a readable safetensors file"),
        (1, r"missing tensor 'W_enc_1'; found \['W_enc_x', "),
        (2, r"tensor 'b_enc_2' has shape \[7\]; expected \[64\]"),
    ],
)
def test_bad_files(env, layer, message):
    with pytest.raises(TranscoderFormatError, match=message):
        CrossLayerTranscoder.from_pretrained("org/broken", layers=[layer], cache_dir=env)


def test_describe_bad_files(env):
    with pytest.raises(TranscoderFormatError, match="W_enc_0.safetensors"):
        describe(open_source("org/broken", cache_dir=env))


def test_unknown_format_lists_files_and_formats(env):
    with pytest.raises(
        TranscoderFormatError, match=r"notes\.txt, weights\.bin.*known formats: .*circuit_tracer"
    ):
        CrossLayerTranscoder.from_pretrained("org/unknown", cache_dir=env)


# ---------------------------------------------------------------------------- sharing and CLI
@pytest.fixture
def cli_main(monkeypatch):
    """cli.main with only the Hub sub-commands (the other modules may not exist yet)."""
    monkeypatch.setattr(
        cli, "COMMANDS", {k: v for k, v in cli.COMMANDS.items() if k in ("inspect", "convert", "push")}
    )
    return cli.main


def test_push_to_hub_round_trip(env, hub, tcs):
    tc = tcs["plt"]
    tc.config.metrics = {"l0": {0: 12.5, 1: 9.0}, "fvu": {0: 0.125}}
    url = tc.push_to_hub("me/pushed-plt", commit_message="first push")
    assert url.startswith(f"{hub.url}/me/pushed-plt/commit/")
    back = CrossLayerTranscoder.from_pretrained("me/pushed-plt", decoders=True, cache_dir=env)
    assert_same_encoders(back, tc, [0, 1])
    torch.testing.assert_close(back.encoder(1).W_dec, tc.encoder(1).W_dec)
    readme = open_source("me/pushed-plt", cache_dir=env).fetch("README.md").read_text()
    meta = yaml.safe_load(readme.split("---")[1])
    assert meta["library_name"] == "sparse-clt-hf" and meta["base_model"] == "tiny-llama"
    assert "transcoder" in meta["tags"]
    assert "| 0 | 48 | resid_mid | relu | 12.5 | 0.125 |" in readme
    assert 'attach_clt(model, "me/pushed-plt"' in readme


def test_cli_push_to_branch_then_inspect_and_convert(env, hub, tcs, tmp_path, capsys, cli_main):
    folder = _saved(tcs["clt"], "tiny-llama")
    assert (
        cli_main(["push", str(folder), "me/cli-clt", "--revision", "exp", "--commit-message", "exp run"]) == 0
    )
    assert not (folder / "README.md").exists()  # the user's folder is left untouched
    assert hub.commits[-1][:2] == ("me/cli-clt", "exp")
    capsys.readouterr()
    assert cli_main(["inspect", "me/cli-clt@exp", "--json", "--cache-dir", str(env)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["kind"], info["layers"], info["d_model"], info["activation"]) == (
        "clt",
        [0, 1, 2],
        D,
        "jumprelu",
    )
    assert info["total_bytes"] > info["decoder_bytes"] > 0
    assert cli_main(["inspect", "me/cli-clt@exp", "--cache-dir", str(env)]) == 0
    text = capsys.readouterr().out
    assert "size on disk" in text and "jumprelu" in text
    out = tmp_path / "converted"
    assert cli_main(["convert", "me/cli-clt@exp", str(out), "--layers", "0-1", "--cache-dir", str(env)]) == 0
    conv = CrossLayerTranscoder.from_pretrained(out, decoders=True)
    assert conv.layers == [0, 1]
    assert_same_encoders(conv, tcs["clt"], [0, 1])
    # branch main of that repo holds only .gitattributes: a clear "unknown format" error, exit code 1
    assert cli_main(["inspect", "me/cli-clt", "--json", "--cache-dir", str(env)]) == 1
    assert "could not recognise" in capsys.readouterr().out


def test_cli_errors_are_reported(env, capsys, cli_main):
    assert cli_main(["inspect", "org/nope", "--cache-dir", str(env)]) == 1
    assert "not found" in capsys.readouterr().err


def test_registry_aliases():
    assert registry.get_entry("gemma-2-2b-clt-426k").repo_id == "mntss/clt-gemma-2-2b-426k"
    assert registry.get_entry("Llama-3.2-1B-CLT-524k").name == "clt-llama-3.2-1b-524k"
