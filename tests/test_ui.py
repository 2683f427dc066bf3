"""The web page through FastAPI's TestClient: the token, CSRF, workspace confinement, the form
generated from the config (every key, the CLI's own errors beside their key), save as YAML, the
data check, escaping, and the page's views of runs and exports.

Jobs and the live tail with real processes are in test_ui_jobs.py; a real browser in
test_ui_browser.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from html import unescape

import pytest
import yaml
from fastapi.testclient import TestClient

from tuneforge.cli import main
from tuneforge.config import build_config, describe, load_config
from tuneforge.data.pipeline import show_loss_mask
from tuneforge.errors import ConfigError, UsageError
from tuneforge.ui import forms
from tuneforge.ui.app import create_app
from tuneforge.ui.datacheck import histogram
from tuneforge.ui.jobs import JobQueue
from tuneforge.ui.runs import eta_seconds
from tuneforge.ui.workspace import Workspace

from helpers import write_toy_messages

TOKEN = "t0k3n-for-the-tests-0123456789"
ERROR = re.compile(r'<div class="error" data-key="([^"]+)">([^<]*)</div>')


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("workspace")
    (root / "data").mkdir()
    write_toy_messages(root / "data" / "train.jsonl", n=24)
    shutil.copytree(tiny_model_dir, root / "models" / "tiny")
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.jsonl").write_text('{"text": "secret"}\n')
    os.symlink(outside, root / "link-out")
    return root


@pytest.fixture
def app(ws):
    app = create_app(ws, TOKEN, supervise=False)
    yield app
    app.state.queue.close()


@pytest.fixture
def client(app):
    client = TestClient(app, base_url="http://127.0.0.1:7860")
    assert client.get(f"/runs?token={TOKEN}", follow_redirects=False).status_code == 303
    return client


def base_form(app, **values) -> dict[str, str]:
    form = {
        "_csrf": app.state.keys.csrf,
        "method.name": "lora",
        "model.name": "models/tiny",
        "data.train": "data/train.jsonl",
        "output.dir": "runs/form",
        "action": "validate",
    }
    form.update(values)
    return form


def errors(html: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, line in ERROR.findall(html):
        out.setdefault(key, []).append(unescape(line))
    return out


# -- the token and CSRF -------------------------------------------------------------------


def test_everything_needs_the_token(app):
    bare = TestClient(app)
    for path in ["/runs", "/new", "/static/app.js", "/api/files", "/run/events?dir=x", "/"]:
        response = bare.get(path, follow_redirects=False)
        assert response.status_code == 401, path
        assert "token" in response.json()["error"]
    assert (
        bare.get("/runs?token=wrong-token-wrong-token", follow_redirects=False).status_code == 403
    )
    assert bare.post("/new", data={"_csrf": app.state.keys.csrf}).status_code == 401
    # a script may use the token as a bearer token instead of the cookie
    headers = {"authorization": f"Bearer {TOKEN}"}
    assert bare.get("/runs", headers=headers).status_code == 200


def test_token_visit_sets_a_cookie_and_drops_the_token_from_the_url(app):
    bare = TestClient(app)
    response = bare.get(f"/run?dir=a&token={TOKEN}", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/run?dir=a"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    assert bare.get("/runs").status_code == 200  # the cookie now opens every page


def test_state_changes_need_the_csrf_token(app, client):
    form = base_form(app)
    for bad in [None, "wrong"]:
        sent = {k: v for k, v in form.items() if k != "_csrf"}
        if bad:
            sent["_csrf"] = bad
        response = client.post("/new", data=sent)
        assert response.status_code == 403 and "CSRF" in response.json()["error"]
    assert client.post("/new", data=form).status_code == 200
    # the header works for scripts; another site's Origin is refused even with the token
    sent = {k: v for k, v in form.items() if k != "_csrf"}
    assert (
        client.post("/new", data=sent, headers={"x-csrf-token": app.state.keys.csrf}).status_code
        == 200
    )
    evil = {"origin": "http://evil.example"}
    assert client.post("/new", data=form, headers=evil).status_code == 403
    assert not (app.state.ws.root / "configs").exists()  # nothing was saved by any of these


def test_security_headers(client):
    response = client.get("/runs")
    csp = response.headers["content-security-policy"]
    assert (
        "script-src 'self'" in csp
        and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
    )
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "same-origin"


# -- confinement --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../", "..", "/etc", "data/../../x", "%2e%2e/x", "link-out", ".tuneforge-ui"]
)
def test_the_file_picker_refuses_to_leave_the_workspace(client, name):
    response = client.get("/api/files", params={"dir": name})
    assert response.status_code == 400
    assert response.json()["error"].startswith("refused:")


def test_the_file_picker_lists_the_workspace(client):
    listing = client.get("/api/files", params={"dir": ""}).json()
    names = [e["name"] for e in listing["entries"]]
    assert names == ["data", "models"]  # the symlink out and the page's state are not listed
    data = client.get("/api/files", params={"dir": "data"}).json()["entries"]
    assert data == [
        {"name": "train.jsonl", "path": "data/train.jsonl", "dir": False, "size": data[0]["size"]}
    ]


@pytest.mark.parametrize(
    "key,value",
    [
        ("data.train", "../outside.jsonl"),
        ("data.train", "/etc/passwd"),
        ("data.train", "link-out/secret.jsonl"),
        ("data.validation", "../../v.jsonl"),
        ("output.dir", "../runs/escape"),
        ("model.name", "/tmp"),
    ],
)
def test_config_paths_outside_the_workspace_are_refused_beside_their_key(app, client, key, value):
    response = client.post("/new", data=base_form(app, **{key: value}, action="launch"))
    assert response.status_code == 422
    found = errors(response.text)
    assert list(found) == [key]
    assert found[key][0].startswith(f"{key}: refused:")
    assert app.state.queue.jobs == []


# -- the generated form -------------------------------------------------------------------


def test_the_form_has_every_key_with_its_default_and_doc(client):
    html = client.get("/new").text
    specs = forms.all_fields()
    by_path = {(s.path, s.method): s for s in specs}
    for path, default, doc in describe():
        method = None
        if path.endswith("]"):
            path, method = path[:-1].split(" [")
        if path == "method.name":
            continue  # the method picker
        spec = by_path.get((path, method))
        if spec is None:  # a key of a sub-section edited as YAML, e.g. eval.early_stopping.*
            parent = path.rsplit(".", 1)[0]
            assert (parent, None) in by_path or (parent.rsplit(".", 1)[0], None) in by_path, path
            continue
        assert spec.doc == doc
        if default != "(required)":
            assert spec.default == forms.show(json.loads(default), spec.kind), path
        assert f'name="{spec.input_name}"' in html, path
    for choice in ["cosine", "cosine_with_min_lr", "polynomial"]:  # allowed values as options
        assert f'<option value="{choice}"' in html
    for method in ["lora", "adalora", "prefix", "prompt", "ptuning", "ia3", "hybrid", "full"]:
        assert f'<option value="{method}"' in html
    assert '<option value="models/tiny">' in html and '<option value="data/train.jsonl">' in html


def test_a_wrong_value_is_named_by_its_key_with_the_clis_own_words(app, client, tmp_path):
    cases = {
        "train.lr": "abc",
        "train.scheduler": "cosin",
        "method:lora:method.r": "-1",
        "data.max_length": "0",
    }
    response = client.post("/new", data=base_form(app, **cases))
    assert response.status_code == 422
    found = errors(response.text)
    # the same config through the CLI's loader gives exactly these lines
    cli_yaml = tmp_path / "same.yaml"
    raw = {
        "train": {"lr": "abc", "scheduler": "cosin"},
        "method": {"name": "lora", "r": -1},
        "data": {"max_length": 0},
    }
    cli_yaml.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_config(cli_yaml)
    expected = sorted(str(err.value).splitlines())
    assert sorted(line for lines in found.values() for line in lines) == expected
    assert set(found) == {"train.lr", "train.scheduler", "method.r", "data.max_length"}
    assert found["train.scheduler"] == [
        "train.scheduler: 'cosin' is not one of constant, linear, cosine, cosine_with_min_lr, "
        "polynomial"
    ]
    # what was typed stays in the form
    assert 'value="abc"' in response.text


def test_a_cross_section_error_lands_on_the_key_it_names(app, client):
    response = client.post("/new", data=base_form(app, **{"eval.metrics": "[bleu]"}))
    found = errors(response.text)
    assert list(found) == ["eval.metrics"]
    assert "set eval.generate: true" in found["eval.metrics"][0]


def test_save_as_yaml_gives_the_file_the_cli_runs(app, client, ws):
    values = {
        "train.lr": "0.005",
        "train.max_steps": "6",
        "train.adam_betas": "[0.8, 0.99]",
        "method:lora:method.r": "4",
        "data.validation": "0.25",
        "eval.early_stopping": "{patience: 2}",
        "config_name": "saved",
        "action": "save",
    }
    response = client.post("/new", data=base_form(app, **values))
    assert response.status_code == 200, errors(response.text)
    path = ws / "configs" / "saved.yaml"
    raw = yaml.safe_load(path.read_text())
    assert raw == {
        "model": {"name": "models/tiny"},
        "method": {"name": "lora", "r": 4},
        "data": {"train": "data/train.jsonl", "validation": 0.25},
        "train": {"max_steps": 6, "lr": 0.005, "adam_betas": [0.8, 0.99]},
        "eval": {"early_stopping": {"patience": 2}},
        "output": {"dir": "runs/form"},
    }
    cfg = load_config(path)
    assert cfg.train.adam_betas == (0.8, 0.99) and cfg.eval.early_stopping.patience == 2
    assert cfg.to_dict() == build_config(raw).to_dict()
    assert main(["config", str(path)]) == 0  # the CLI takes it as it is
    # the download gives the same text, and the form reads the file back
    download = client.post("/new", data=base_form(app, **{**values, "action": "yaml"}))
    assert download.headers["content-disposition"] == 'attachment; filename="saved.yaml"'
    assert download.text == path.read_text()
    again = client.get("/new", params={"config": "configs/saved.yaml"}).text
    assert 'name="train.lr" id="f-train.lr" value="0.005"' in again
    assert 'name="method:lora:method.r" id="f-method:lora:method.r" value="4"' in again
    path.unlink()


def test_launch_queues_the_cli_command_and_refuses_a_busy_run_dir(app, client):
    form = base_form(app, **{"output.dir": "runs/queued", "config_name": "q", "action": "launch"})
    response = client.post("/new", data=form, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/run?dir=runs/queued"
    (job,) = app.state.queue.jobs
    assert (job.kind, job.run, job.state) == ("train", "runs/queued", "queued")
    assert job.argv == ["train", "configs/q.yaml", "--quiet"]
    again = client.post("/new", data=form)
    assert errors(again.text)["output.dir"] == [
        "output.dir: runs/queued is the directory of a queued run; choose another"
    ]
    page = client.get("/run", params={"dir": "runs/queued"}).text
    assert "Remove from queue" in page
    cancel = {"_csrf": app.state.keys.csrf, "dir": "runs/queued"}
    assert client.post("/run/cancel", data=cancel, follow_redirects=False).status_code == 303
    assert job.state == "cancelled"
    app.state.queue.jobs.clear()
    app.state.queue._save()


def test_user_text_is_escaped(app, client, ws):
    evil = "<img src=x onerror=alert(1)>.jsonl"
    (ws / "data" / evil).write_text('{"text": "hi"}\n')
    try:
        html = client.get("/new").text
        assert evil not in html and "&lt;img src=x onerror=alert(1)&gt;.jsonl" in html
        response = client.post("/new", data=base_form(app, **{"data.train": "<b>bold</b>"}))
        assert "<b>bold</b>" not in response.text and "&lt;b&gt;bold&lt;/b&gt;" in response.text
    finally:
        (ws / "data" / evil).unlink()


# -- data check ---------------------------------------------------------------------------


def test_data_check_shows_counts_bad_rows_lengths_and_the_trained_tokens(
    app, client, ws, tiny_tokenizer
):
    lines = (ws / "data" / "train.jsonl").read_text().splitlines()
    bad = "\n".join(lines[:2] + ["{not json", '{"messages": []}'] + lines[2:]) + "\n"
    (ws / "data" / "bad.jsonl").write_text(bad)
    (ws / "configs").mkdir(exist_ok=True)
    cfg = {
        "model": {"name": "models/tiny"},
        "data": {"train": "data/bad.jsonl", "validation": 0.25, "max_length": 64},
    }
    (ws / "configs" / "check.yaml").write_text(yaml.safe_dump(cfg))
    html = client.get("/data", params={"config": "configs/check.yaml"}).text
    assert "Training would stop here" in html
    rows = re.findall(r"<li><code>([^<]*)</code></li>", html)
    assert [unescape(r).split(":")[:2] for r in rows] == [
        ["data/bad.jsonl", "3"],
        ["data/bad.jsonl", "4"],
    ]
    counts = dict(re.findall(r"<tr><th>([^<]+)</th><td[^>]*>([^<]*)</td></tr>", html))
    assert counts["rows read"] == "26" and counts["rows used"] == "24"
    assert counts["split"] == "train 18, validation 6"
    bars = [int(n) for n in re.findall(r"tokens: (\d+) rows</title>", html)]
    assert sum(bars) == 24
    # the highlighted spans are exactly the tokens with loss (the CLI's [[...]] rendering)
    example = re.search(r'<pre class="example" id="example">(.*?)</pre>', html, re.S).group(1)
    marked = re.sub(r"<mark>(.*?)</mark>", r"[[\1]]", example, flags=re.S)
    cfg_abs = load_config(ws / "configs" / "check.yaml")
    from tuneforge.recipes.parts import prepare_run_data

    skip = cfg_abs.model_copy(
        update={
            "data": cfg_abs.data.model_copy(
                update={"train": str(ws / "data" / "bad.jsonl"), "on_bad_row": "skip"}
            ),
            "model": cfg_abs.model.model_copy(update={"name": str(ws / "models" / "tiny")}),
        }
    )
    first = prepare_run_data(skip, tiny_tokenizer).train[0]
    assert unescape(marked) == show_loss_mask(first, tiny_tokenizer)
    (ws / "data" / "bad.jsonl").unlink()


def test_histogram_bins():
    assert histogram([]) == []
    assert histogram([5, 5, 5]) == [{"lo": 5, "hi": 5, "count": 3}]
    bins = histogram([1, 2, 3, 40], bins=4)  # width ceil(40 / 4) = 10
    assert bins == [
        {"lo": 1, "hi": 10, "count": 3},
        {"lo": 11, "hi": 20, "count": 0},
        {"lo": 21, "hi": 30, "count": 0},
        {"lo": 31, "hi": 40, "count": 1},
    ]


# -- runs, compare, export views ----------------------------------------------------------


def fake_finished_run(root, rel, losses, eval_loss, method="lora"):
    """A run directory as the trainer leaves it (the files the pages read)."""
    run = root / rel
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        yaml.safe_dump({"method": {"name": method}, "model": {"name": "m"}})
    )
    (run / "manifest.json").write_text(json.dumps({"total_steps": len(losses)}))
    records = [
        {"step": i + 1, "loss": v, "lr": 0.1, "tokens_per_s": 100.0, "elapsed_s": float(i + 1)}
        for i, v in enumerate(losses)
    ]
    records.append({"step": len(losses), "train_loss": 1.0, "eval_loss": eval_loss})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {
        "steps": len(losses),
        "total_steps": len(losses),
        "train_loss": sum(losses) / len(losses),
    }
    summary.update({"tokens_per_s": 123.5, "eval": {"eval_loss": eval_loss}})
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_runs_list_compare_and_metrics_api(tmp_path, tiny_model_dir):
    fake_finished_run(tmp_path, "runs/a", [3.0, 2.0, 1.5], 1.75)
    fake_finished_run(tmp_path, "runs/b", [3.0, 2.5], 2.25, method="ia3")
    app = create_app(tmp_path, TOKEN, supervise=False)
    try:
        client = TestClient(app)
        client.get(f"/?token={TOKEN}")
        html = client.get("/runs").text
        assert html.count('<span class="state finished">finished</span>') == 2
        assert client.get("/api/metrics", params={"dir": "runs/a"}).json()["loss"] == [
            [1, 3.0],
            [2, 2.0],
            [3, 1.5],
        ]
        page = client.get("/compare", params={"runs": ["runs/a", "runs/b"]}).text
        table = page[page.index('id="compare-table"') :]
        header = re.findall(r"<th>([^<]+)</th>", table.split("</tr>")[0])
        cells = [
            re.findall(r'<td class="num">([^<]*)</td>', row) for row in table.split("</tr>")[1:3]
        ]
        col = header.index("eval_loss") - 1  # the first column is the run
        assert [row[col] for row in cells] == ["1.7500", "2.2500"]
        assert [row[header.index("method") - 1] for row in cells] == ["lora", "ia3"]
        run_page = client.get("/run", params={"dir": "runs/a"}).text
        assert 'id="chart-loss"' in run_page and "123.5" in run_page
        assert client.get("/run", params={"dir": "runs/nope"}).status_code == 400
    finally:
        app.state.queue.close()


def test_eta_from_the_latest_stretch_of_one_process():
    def rec(step, elapsed):
        return {"step": step, "loss": 1.0, "elapsed_s": elapsed}

    # a resumed run: elapsed_s restarts at step 11; 2 s per step since then, 10 steps left
    train = [rec(s, 1.0 * s) for s in range(1, 11)] + [rec(11, 2.0), rec(12, 4.0), rec(13, 6.0)]
    assert eta_seconds(train, 23) == pytest.approx(20.0)
    assert eta_seconds(train[:1], 23) is None and eta_seconds(train, None) is None


def test_export_page_shows_the_recheck_table(tmp_path):
    run = fake_finished_run(tmp_path, "runs/x", [2.0, 1.0], 1.5)
    (run / "export-gguf").mkdir()
    report = {
        "format": "gguf",
        "data": "held-out.jsonl",
        "examples": 50,
        "passed": False,
        "artefacts": [
            {"name": "reference", "size_mb": 10.0, "status": "reference", "metrics": {"loss": 1.5}},
            {
                "name": "gguf-q4_k_m",
                "size_mb": 2.5,
                "status": "failed",
                "metrics": {"loss": 1.62},
                "deltas": {"loss": 0.12},
                "failures": ["loss regressed by 0.1200 > 0.05"],
            },
        ],
    }
    (run / "export-gguf" / "export.json").write_text(json.dumps(report))
    app = create_app(tmp_path, TOKEN, supervise=False)
    try:
        client = TestClient(app)
        client.get(f"/?token={TOKEN}")
        html = client.get("/export", params={"dir": "runs/x"}).text
        assert "gguf-q4_k_m" in html and "1.6200 (+0.1200)" in html
        assert "loss regressed by 0.1200 &gt; 0.05" in html
        assert '<span class="state failed">failed</span>' in html
        form = {"_csrf": app.state.keys.csrf, "dir": "runs/x", "format": "gguf", "quant": "q9"}
        response = client.post("/export", data=form)
        assert response.status_code == 400
        assert app.state.queue.jobs == []
        # the buttons are on, and one queues `tuneforge export` like a training job
        assert html.count("<button>Export ") == 3 and "disabled" not in html
        response = client.post("/export", data={**form, "quant": "q8_0"}, follow_redirects=False)
        assert response.status_code == 303
        [job] = app.state.queue.jobs
        assert (job.kind, job.run, job.state) == ("export", "runs/x", "queued")
        assert job.argv == [
            "export",
            "runs/x",
            "--format",
            "gguf",
            "--overwrite",
            "--quant",
            "q8_0",
        ]
        html = client.get("/export", params={"dir": "runs/x"}).text
        assert html.count("<button disabled>Export ") == 3  # while its job is queued
    finally:
        app.state.queue.close()


def test_one_page_per_workspace(tmp_path):
    queue = JobQueue(Workspace(tmp_path))
    with pytest.raises(UsageError, match="another `tuneforge ui` is serving it"):
        JobQueue(Workspace(tmp_path))
    queue.close()
    JobQueue(Workspace(tmp_path)).close()  # free again once the first one closed
