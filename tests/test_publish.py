"""`covspec publish`: the card, the refusals, and the upload with only the HTTP layer faked.

The upload tests swap huggingface_hub's HTTP client for one whose transport is an in-process fake
Hub (`set_client_factory` + `httpx2.MockTransport`); everything above the transport (HfApi,
create_repo, upload_folder, the preupload / commit protocol) is the installed library's own code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import ModelCard, constants, metadata_load, set_client_factory
from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook

from covspec.modeling.adapters import adapter_for
from covspec.modeling.drafter import Drafter, DrafterConfig
from covspec.scripts.cli import main
from covspec.scripts.publish import PublishError, publish
from tests.tiny_vlms import llava

TARGET = "llava-hf/llava-1.5-7b-hf"
REPO = "my-org/toy-drafter"
METRICS = {"val/agree_1": 0.9, "val/agree_2": 0.8, "val/agree_3": 0.7, "val/loss": 1.25}
METRICS["val/tau"] = 1 + 0.9 + 0.9 * 0.8 + 0.9 * 0.8 * 0.7
README = """---
library_name: transformers
tags: [speculative-decoding, eagle, drafter, covspec]
---
# covspec drafter (visual_free)

## Training recipe (resolved)

```yaml
seed_everything: 0
model:
  target: checkpoints/toy-target
  variant: visual_free
  unroll_steps: 3
data:
  train_data: toy:30000:11
  val_data: toy:240:777
```
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """An exported drafter folder as ExportDrafter writes it; tests must never change it."""
    model, _ = llava()
    cfg = DrafterConfig.for_target(adapter_for(model), target_name_or_path=TARGET)
    out = tmp_path_factory.mktemp("export") / "toy-drafter"
    Drafter(cfg).save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps(METRICS, indent=2, sort_keys=True))
    (out / "README.md").write_text(README)
    return out


@pytest.fixture
def drafter_dir(exported, tmp_path) -> Path:
    """A private copy that a test may edit."""
    return Path(shutil.copytree(exported, tmp_path / "checkpoints" / "toy-drafter"))


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_dry_run_writes_a_card_huggingface_hub_parses(exported, tmp_path, capsys):
    before = _snapshot(exported)
    out = tmp_path / "preview.publish-dry-run"
    result = publish(exported, REPO, dry_run=True, dry_run_dir=str(out), license="apache-2.0")
    assert _snapshot(exported) == before  # the source folder is never modified
    assert result.staging == out and {n for n, _ in result.files} == {
        "README.md",
        "config.json",
        "metrics.json",
        "model.safetensors",
    }
    assert result.total_bytes == sum(p.stat().st_size for p in out.iterdir())
    assert (out / "model.safetensors").read_bytes() == (exported / "model.safetensors").read_bytes()

    meta = metadata_load(out / "README.md")
    assert meta["base_model"] == TARGET and meta["library_name"] == "transformers"
    assert meta["license"] == "apache-2.0"
    assert {"speculative-decoding", "eagle3", "drafter", "covspec", "visual-free"} <= set(
        meta["tags"]
    )
    card = ModelCard.load(out / "README.md")
    values = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert values == {
        "agreement_depth_1": 0.9,
        "agreement_depth_2": 0.8,
        "agreement_depth_3": 0.7,
        "implied_tau": round(METRICS["val/tau"], 4),
    }
    result0 = card.data.eval_results[0]
    assert result0.task_type == "text-generation"
    assert result0.dataset_name == "toy:240:777 (validation)"
    assert "from covspec.modeling.drafter import Drafter" in card.text
    assert "val_data: toy:240:777" in card.text and "| 2 | 0.8000 |" in card.text

    # the default dry-run folder is a sibling named after the repo; the CLI prints the listing
    assert main(["publish", str(exported), "--repo-id", REPO, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert (exported.parent / "toy-drafter.publish-dry-run" / "README.md").is_file()
    assert "model.safetensors" in printed and re.search(r"total: [\d,]+ bytes in 4 files", printed)
    assert _snapshot(exported) == before


def test_local_target_needs_base_model(drafter_dir, tmp_path):
    (tmp_path / "checkpoints" / "toy-target").mkdir()
    for local in (str(tmp_path / "toy-target"), "checkpoints/toy-target", "./toy-target"):
        _edit_config(drafter_dir, target_name_or_path=local)
        with pytest.raises(PublishError, match="pass --base-model with the Hub id"):
            publish(drafter_dir, REPO, dry_run=True)
    result = publish(drafter_dir, REPO, dry_run=True, base_model="llava-hf/llava-v1.6-7b-hf")
    assert result.metadata["base_model"] == "llava-hf/llava-v1.6-7b-hf"
    with pytest.raises(PublishError, match="--base-model '/x/y' is not a Hub model id"):
        publish(drafter_dir, REPO, dry_run=True, base_model="/x/y")


def test_folder_refusals(drafter_dir, tmp_path):
    with pytest.raises(PublishError, match="folder not found: .*nowhere"):
        publish(tmp_path / "nowhere", REPO, dry_run=True)
    with pytest.raises(PublishError, match="--repo-id 'a/b/c' is not a Hub repo id"):
        publish(drafter_dir, "a/b/c", dry_run=True)

    nest = tmp_path / "old.publish-dry-run"  # a dry-run folder's name, holding the source
    shutil.copytree(drafter_dir, nest / "toy-drafter")
    with pytest.raises(PublishError, match="is, holds or is inside the source"):
        publish(nest / "toy-drafter", REPO, dry_run=True, dry_run_dir=str(nest))
    assert (nest / "toy-drafter" / "config.json").is_file()  # never removed by a dry run
    with pytest.raises(PublishError, match="not the target this drafter was trained for"):
        publish(drafter_dir, REPO, dry_run=True, base_model="meta-llama/Llama-3.1-8B")

    _edit_config(drafter_dir, model_type="covspec_compressor")
    with pytest.raises(PublishError, match="model_type 'covspec_compressor'.*covspec_drafter"):
        publish(drafter_dir, REPO, dry_run=True)

    for name in ("pytorch_model.bin", "optimizer.PT", "arr.pkl.gz", "extra.joblib", "run.py"):
        (drafter_dir / name).write_bytes(b"pickle")
        with pytest.raises(PublishError, match=rf"not safetensors.*\['{re.escape(name)}'\]"):
            publish(drafter_dir, REPO, dry_run=True)
        (drafter_dir / name).unlink()

    (drafter_dir / "model.safetensors").unlink()
    with pytest.raises(PublishError, match="has no model.safetensors"):
        publish(drafter_dir, REPO, dry_run=True)


def test_no_token_refused(drafter_dir, monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(drafter_dir.parent / "no-token"))
    with pytest.raises(PublishError, match="no Hugging Face token: pass --token, set HF_TOKEN"):
        publish(drafter_dir, REPO)


class FakeHub:
    """Answers the Hub endpoints create_repo + upload_folder use, recording every request."""

    def __init__(self, create_status: int = 200) -> None:
        self.create_status = create_status
        self.requests: list[tuple[str, str, bytes]] = []
        self.private = False  # an existing repo's visibility
        self.remote_files: list[str] = []  # an existing repo's files
        self.card_error: str | None = None  # the Hub's /api/validate-yaml verdict

    def calls(self) -> list[str]:
        """The requests in order, less huggingface_hub's best-effort telemetry lookup
        (GET /api/agent-harnesses, made once for its user-agent; a 404 is swallowed)."""
        return [f"{m} {p}" for m, p, _ in self.requests if p != "/api/agent-harnesses"]

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path, body = request.url.path, request.read()
        self.requests.append((request.method, path, body))
        if path == "/api/agent-harnesses":
            return httpx2.Response(404)
        assert request.headers["authorization"] == "Bearer hf_fake"
        if path == "/api/repos/create":
            p = json.loads(body)
            url = f"https://huggingface.co/{p['organization']}/{p['name']}"
            if self.create_status == 409:  # the Hub's answer carries the url too
                error = "You already created this model repo"
                return httpx2.Response(409, json={"error": error, "url": url})
            if self.create_status == 403:  # a token that may write but not create
                return httpx2.Response(403, json={"error": "no create permission"})
            return httpx2.Response(200, json={"url": url})
        if path == "/api/validate-yaml":
            if self.card_error:
                return httpx2.Response(400, json={"errors": [{"message": self.card_error}]})
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if path == "/api/repos/delete":
            return httpx2.Response(200, json={})
        if re.fullmatch(r"/api/models/[^/]+/[^/]+", path) and request.method == "GET":
            return httpx2.Response(200, json={"id": REPO, "private": self.private, "sha": "a" * 40})
        if re.fullmatch(r"/api/models/[^/]+/[^/]+/tree/main.*", path):
            tree = [
                {"type": "file", "path": f, "size": 1, "oid": "b" * 40} for f in self.remote_files
            ]
            return httpx2.Response(200, json=tree)
        if re.fullmatch(r"/api/models/[^/]+/[^/]+/preupload/main", path):
            files = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                for f in json.loads(body)["files"]
            ]
            return httpx2.Response(200, json={"files": files})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/main", path):
            url = f"https://huggingface.co/{m.group(1)}/commit/{'a' * 40}"
            return httpx2.Response(200, json={"commitUrl": url, "commitOid": "a" * 40})
        return httpx2.Response(404, json={"error": f"fake hub: no {request.method} {path}"})

    def deleted(self) -> list[str]:
        """Paths the commit deletes from the repo."""
        (body,) = [b for m, p, b in self.requests if p.endswith("/commit/main")]
        lines = [json.loads(line) for line in body.splitlines() if line]
        return sorted(x["value"]["path"] for x in lines[1:] if x["key"] == "deletedFile")

    def committed(self) -> dict[str, bytes]:
        """{path in repo: content} of the commit's ndjson payload."""
        (body,) = [b for m, p, b in self.requests if p.endswith("/commit/main")]
        lines = [json.loads(line) for line in body.splitlines() if line]
        assert lines[0]["key"] == "header"
        return {
            x["value"]["path"]: base64.b64decode(x["value"]["content"])
            for x in lines[1:]
            if x["key"] == "file"
        }


@pytest.fixture
def fake_hub(monkeypatch):
    """Route huggingface_hub's HTTP client to a FakeHub (its own offline hook kept)."""
    hub = FakeHub()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1
    set_client_factory(
        lambda: httpx2.Client(
            transport=httpx2.MockTransport(hub),
            event_hooks={"request": [hf_request_event_hook]},
            follow_redirects=True,
        )
    )
    yield hub
    set_client_factory(default_client_factory)


@pytest.mark.parametrize("xet", [True, False], ids=["xet-pipeline", "create-commit"])
def test_upload_creates_repo_and_commits_the_staged_files(drafter_dir, fake_hub, monkeypatch, xet):
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
    before = _snapshot(drafter_dir)
    result = publish(drafter_dir, REPO, private=True, token="hf_fake", commit_message="first")
    assert result.url == f"https://huggingface.co/{REPO}/commit/{'a' * 40}"
    assert fake_hub.calls()[0] == "POST /api/repos/create"
    create = next(b for m, p, b in fake_hub.requests if p == "/api/repos/create")
    assert json.loads(create) == {
        "name": "toy-drafter",
        "organization": "my-org",
        "visibility": "private",
    }
    assert f"POST /api/models/{REPO}/preupload/main" in fake_hub.calls()
    assert fake_hub.calls()[-1] == f"POST /api/models/{REPO}/commit/main"
    files = fake_hub.committed()
    assert sorted(files) == ["README.md", "config.json", "metrics.json", "model.safetensors"]
    assert files["model.safetensors"] == (drafter_dir / "model.safetensors").read_bytes()
    assert f"base_model: {TARGET}" in files["README.md"].decode()
    assert _snapshot(drafter_dir) == before
    assert not list(drafter_dir.parent.glob(".toy-drafter.publish-*"))  # staging removed


def test_existing_repo_needs_exist_ok(drafter_dir, fake_hub):
    fake_hub.create_status = 409
    with pytest.raises(PublishError, match=f"repo {REPO} already exists.*pass --exist-ok"):
        publish(drafter_dir, REPO, token="hf_fake")
    assert fake_hub.calls() == ["POST /api/repos/create"]  # nothing uploaded
    create = next(b for m, p, b in fake_hub.requests if p == "/api/repos/create")
    assert "visibility" not in json.loads(create)  # the account's default is kept

    fake_hub.remote_files = ["pytorch_model.bin", "README.md"]  # an older upload's files
    result = publish(drafter_dir, REPO, token="hf_fake", exist_ok=True)
    assert result.url.endswith("a" * 40) and "README.md" in fake_hub.committed()
    assert "pytorch_model.bin" in fake_hub.deleted()  # no stale pickle beside the new card
    with pytest.raises(PublishError, match="exists and is public: --private cannot apply"):
        publish(drafter_dir, REPO, token="hf_fake", exist_ok=True, private=True)
    fake_hub.private = True
    publish(drafter_dir, REPO, token="hf_fake", exist_ok=True, private=True)
    fake_hub.create_status = 403  # may write to the existing repo, may not create one
    publish(drafter_dir, REPO, token="hf_fake", exist_ok=True)
    with pytest.raises(PublishError, match="creating .* failed"):
        publish(drafter_dir, REPO, token="hf_fake")  # without --exist-ok a 403 is a refusal


def test_a_refused_card_leaves_no_empty_repo(drafter_dir, fake_hub):
    fake_hub.card_error = "license: must be one of the Hub's licenses"
    with pytest.raises(PublishError, match="license.*the repo it had created was deleted"):
        publish(drafter_dir, REPO, token="hf_fake")
    assert "DELETE /api/repos/delete" in fake_hub.calls()


def test_offline_mode_refused(drafter_dir, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE is set"):
        publish(drafter_dir, REPO, token="hf_fake")


def test_a_folder_replaced_mid_publish_is_refused(drafter_dir, fake_hub, monkeypatch, tmp_path):
    """An export that swaps a new folder in after the card was read and before the weights
    were staged would pair the new weights with the old card: refused, nothing uploaded."""
    import covspec.scripts.publish as pub
    from covspec.modeling.outputs import write_folder

    real_stage = pub.stage

    def stage_after_an_export(folder, out, files, card, link):
        write_folder(
            folder, lambda tmp: shutil.copytree(folder, tmp, dirs_exist_ok=True), overwrite=True
        )
        return real_stage(folder, out, files, card, link)

    monkeypatch.setattr(pub, "stage", stage_after_an_export)
    with pytest.raises(PublishError, match="was replaced while it was being published"):
        publish(drafter_dir, REPO, dry_run=True, dry_run_dir=str(tmp_path / "preview"))
    with pytest.raises(PublishError, match="was replaced while it was being published"):
        publish(drafter_dir, REPO, token="hf_fake")
    assert fake_hub.calls() == []  # refused before the repo was created
    monkeypatch.setattr(pub, "stage", real_stage)  # no export meanwhile: published
    assert publish(drafter_dir, REPO, token="hf_fake").url.endswith("a" * 40)
