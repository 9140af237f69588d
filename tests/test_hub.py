"""`train.push_to_hub` and `unitune push`, up to the point where they would need the network: the
Hub is a local HTTP server (`HF_ENDPOINT`). The create-repo request carries the token and the repo
id; a server error is one line saying where the model is saved and how to push it later, without
the token; repo ids are checked at config time; no token is an error before training."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub.constants
import pytest
import yaml
from typer.testing import CliRunner

from unitune.cli import app
from unitune.config import ConfigError, parse_config
from unitune.jobs import train
from unitune.training.hub import HubError, push_model

TOKEN = "hf_" + "T0k3n" * 8  # shaped like a real token; the server echoes it back


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A local 'Hub' answering every request with HTTP 500 (its body echoes the Authorization
    header); yields the requests it got as (method, path, headers, body)."""
    got: list[tuple[str, str, dict, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            got.append((self.command, self.path, dict(self.headers), body))
            msg = json.dumps({"error": f"internal error ({self.headers.get('Authorization')})"})
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg.encode())

        do_GET = do_POST = do_PUT = do_HEAD = _answer

        def log_message(self, *args) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    yield got
    server.shutdown()
    server.server_close()


def create_requests(got) -> list[tuple[str, str, dict, bytes]]:
    return [r for r in got if r[0] == "POST" and r[1] == "/api/repos/create"]


def test_create_repo_request_and_server_error(hub, tmp_path):
    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    with pytest.raises(HubError) as err:
        push_model(model, "someone/tiny-model", private=True)
    (req,) = create_requests(hub)
    headers = {k.lower(): v for k, v in req[2].items()}
    assert headers["authorization"] == f"Bearer {TOKEN}"
    body = json.loads(req[3])
    assert body["name"] == "tiny-model" and body["organization"] == "someone"
    assert body.get("visibility") == "private" or body.get("private") is True
    msg = str(err.value)
    assert "\n" not in msg and TOKEN not in msg
    assert msg.startswith("push to someone/tiny-model failed: ")
    assert "(internal error (Bearer ***))" in msg  # the server echoed the token: masked
    assert f"the model is saved locally at {model}" in msg
    assert f"push it later with: unitune push {model.parent} someone/tiny-model" in msg


def test_training_run_that_cannot_push_keeps_the_model(hub, tiny_config, tmp_path):
    raw = tiny_config("alright", max_steps=2, push_to_hub="someone/tiny-model")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["train", str(path), "--no-progress"])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and TOKEN not in res.output
    (line,) = [x[x.index("error: ") :] for x in res.output.splitlines() if "error: " in x]
    out = Path(raw["output_dir"])
    assert f"saved locally at {out / 'model'}" in line and "unitune push" in line
    assert len(create_requests(hub)) == 1
    assert (out / "summary.json").exists() and (out / "model" / "README.md").exists()
    for f in ("config.yaml", "summary.json", "model/README.md", "metrics.jsonl"):
        assert TOKEN not in (out / f).read_text(), f
    # `unitune push` later: the same one-line error, the card rewritten to name the repo
    res = CliRunner().invoke(app, ["push", str(out), "someone/tiny-model"])
    assert res.exit_code == 2 and TOKEN not in res.output
    assert res.output.startswith("error: push to someone/tiny-model failed"), res.output
    assert 'from_pretrained("someone/tiny-model")' in (out / "model" / "README.md").read_text()


def test_repo_id_is_checked_at_config_time(tiny_config):
    parse_config(tiny_config("alright", push_to_hub="someone/name-1.0"))
    parse_config(tiny_config("alright", push_to_hub="name"))
    for bad in ("a/b/c", "bad repo", "someone/--x", "someone/x.git", "/x"):
        with pytest.raises(ConfigError, match="train.push_to_hub"):
            parse_config(tiny_config("alright", push_to_hub=bad))
    with pytest.raises(ConfigError, match="save_model"):
        parse_config(tiny_config("alright", push_to_hub="someone/x", save_model=False))
    raw = tiny_config("parallel", push_to_hub="someone/x")
    with pytest.raises(ConfigError, match="unitune push"):
        parse_config(raw)


def test_no_token_fails_before_training(tiny_config, tmp_path, monkeypatch):
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    raw = tiny_config("alright", push_to_hub="someone/x")
    with pytest.raises(HubError, match="no Hugging Face token: set HF_TOKEN"):
        train(parse_config(raw), progress=False)
    assert not Path(raw["output_dir"]).exists()


def test_push_command_checks_its_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    res = CliRunner().invoke(app, ["push", str(tmp_path), "bad repo"])
    assert res.exit_code == 2 and "not a valid repo id" in res.output
    res = CliRunner().invoke(app, ["push", str(tmp_path), "someone/x"])
    assert res.exit_code == 2 and "model does not exist" in res.output
