"""serve.py: the generate API against DirectDecoderPipeline (bitwise), its refusals, the job API (options, path
confinement, SSE to the end, cancel), and a real server on 127.0.0.1 killed mid-job, restarted and resumed."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import time

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from helpers import run_main_in_process, served_test_client, start_server, stop_server
from models.api import DirectDecoderPipeline
from models.server.app import MAX_BODY_BYTES, create_app
from models.server.generation import GenerationService
from models.server.jobs import JobManager
from models.server.serving import find_features
from models.server.stages import NOT_PATH_OPTIONS, PATH_OPTIONS, STAGE_SCRIPTS, stage_options
from models.steering.hooks import compose

TINY_GENERATE = {"n_samples": 24, "batch_size": 4, "steps": 3, "spacing": "leading", "cpu": True}


@pytest.fixture(scope="module")
def server(tiny_pipeline, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("serve_work")
    with served_test_client(tiny_pipeline, workdir) as (client, _):
        yield client, workdir, tiny_pipeline


def decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def read_events(response) -> list[tuple[str, dict]]:
    """Parses a server-sent event stream to its end: [(event, data)]."""
    events, name, data = [], None, []
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line.strip() and name:
            events.append((name, json.loads("\n".join(data))))
            name, data = None, []
    return events


def test_generate_is_the_pipeline_bitwise(server):
    client, _, tiny = server
    hooks = [{"type": "class", "label": 0, "strength": 0.6}, {"type": "include", "indices": [1, 2], "strength": 0.4},
             {"type": "exclude", "indices": [5], "strength": 0.3},
             {"type": "interpolate", "a": [7], "b": [8, 9], "alpha": 0.25, "strength": 0.5}]
    r = client.post("/v1/generate", json={"n": 6, "seed": 11, "hooks": hooks, "top_k": 4, "raw": True})
    assert r.status_code == 200, r.text
    body = r.json()
    pipe = DirectDecoderPipeline.load(str(tiny.teacher), str(tiny.student), str(tiny.features), device="cpu")
    hook = compose(pipe.toward_class(0, 0.6), pipe.include([1, 2], 0.4), pipe.exclude([5], 0.3),
                   pipe.interpolate([7], [8, 9], 0.25, 0.5))
    expected = pipe.generate(6, seed=11, hook=hook, top_k=4)
    raw = torch.from_numpy(np.frombuffer(base64.b64decode(body["raw_f32"]), dtype="<f4").copy()).reshape(6, 1, 28, 28)
    assert torch.equal(raw, expected.images)
    baseline = client.post("/v1/generate", json={"n": 6, "seed": 11, "raw": True}).json()
    assert baseline["raw_f32"] != body["raw_f32"], "the hooks changed nothing"
    for i, item in enumerate(body["images"]):
        assert [t["index"] for t in item["top_k"]] == expected.top_k_indices[i].tolist()
        assert [t["label"] for t in item["top_k"]] == expected.top_k_labels[i].tolist()
        assert [t["score"] for t in item["top_k"]] == expected.top_k_scores[i].tolist()
        assert [t["percentile"] for t in item["top_k"]] == expected.top_k_percentiles[i].tolist()
        png = decode_png(item["png"])
        assert png.shape[:2] == (28, 28)
        pixels = ((expected.images[i, 0] + 1) / 2).clamp(0, 1).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
        assert np.array_equal(png if png.ndim == 2 else png[..., 0], pixels.numpy())
    assert decode_png(body["grid_png"]).shape[:2] == (2 + 2 * 30, 2 + 3 * 30)  # 2 rows of 3, 2-pixel padding
    assert body["n"] == 6 and body["seed"] == 11
    assert body["attribute_by"] == expected.attribute_by == "shape"  # the tiny features' default rule


def test_top_k_zero_and_training_images(server):
    client, _, tiny = server
    body = client.post("/v1/generate", json={"n": 2, "top_k": 0}).json()
    assert [item["top_k"] for item in body["images"]] == [[], []]
    from models.data.datasets import load_dataset
    data = load_dataset("mnist5k")
    r = client.get("/v1/train_images/7")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-label"] == str(int(data.labels[7]))
    expected = ((data.images[7, 0] + 1) / 2).mul(255).add(0.5).clamp(0, 255).to(torch.uint8).numpy()
    png = np.asarray(Image.open(io.BytesIO(r.content)))
    assert np.array_equal(png if png.ndim == 2 else png[..., 0], expected)
    assert client.get("/v1/train_images/120").status_code == 404  # tiny features cover the first 120 images
    assert "0..119" in client.get("/v1/train_images/120").json()["detail"]
    assert client.get("/v1/train_images/-1").status_code == 422
    assert client.get("/v1/train_images/abc").status_code == 422
    listing = client.get("/v1/train_images", params={"label": 0, "offset": 100, "limit": 50}).json()
    assert listing["total"] == 120 and [t["index"] for t in listing["items"]] == list(range(100, 120))


def test_attribute_by_image_is_the_pipelines_re_encoded_rule(server):
    """attribute_by "image" reports the training images nearest the generated image read back by the image encoder:
    the pipeline's own answer, and not the bottleneck rule's."""
    client, _, tiny = server
    pipe = DirectDecoderPipeline.load(str(tiny.teacher), str(tiny.student), str(tiny.features), device="cpu")
    body = client.post("/v1/generate", json={"n": 8, "seed": 5, "top_k": 3, "attribute_by": "image"}).json()
    expected = pipe.generate(8, seed=5, top_k=3, attribute_by="image")
    by_bottleneck = pipe.generate(8, seed=5, top_k=3, attribute_by="bottleneck")
    got = [[t["index"] for t in item["top_k"]] for item in body["images"]]
    assert got == expected.top_k_indices.tolist()
    assert got != by_bottleneck.top_k_indices.tolist()
    encoded = pipe.steering.encode_images(expected.images)
    assert torch.equal(expected.top_k_indices, pipe.steering.attribute(encoded, 3)[1])


def test_attribute_by_image_without_an_image_encoder_is_a_422(server, tmp_path):
    """Features extracted by DDIM inversion carry no image encoder: asking to attribute by the image is refused in
    one line (422), whatever top_k, instead of failing inside the pipeline."""
    _, _, tiny = server
    pipe = DirectDecoderPipeline.load(str(tiny.teacher), str(tiny.student), str(tiny.features), device="cpu")
    pipe.reference.pop("image_encoder")
    workdir = tmp_path / "work"
    jobs = JobManager(workdir, {"teacher": str(tiny.teacher), "student": str(tiny.student),
                                "features": str(tiny.features)})
    with TestClient(create_app(GenerationService(pipe), jobs, {})) as client:
        for top_k in (0, 3):
            r = client.post("/v1/generate", json={"n": 2, "top_k": top_k, "attribute_by": "image"})
            assert r.status_code == 422 and "carry no image encoder" in r.json()["detail"], r.text
        assert client.post("/v1/generate", json={"n": 2, "top_k": 3}).status_code == 200


BAD_GENERATE = [
    ({"attribute_by": "pixels"}, "attribute_by: Input should be 'auto', 'shape', 'bottleneck' or 'image'"),
    ({"n": 0}, "n: Input should be greater than or equal to 1"),
    ({"n": 65}, "n: Input should be less than or equal to 64"),
    ({"n": "4"}, "n: Input should be a valid integer"),
    ({"top_k": 21}, "top_k: Input should be less than or equal to 20"),
    ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
    ({"size": 3}, "size: Extra inputs are not permitted"),
    ({"hooks": [{"type": "blur"}]}, "does not match any of the expected tags"),
    ({"hooks": [{"type": "class", "label": 3}]}, "hooks[0] (class): target_class 3 is not a label of the reference"),
    ({"hooks": [{"type": "class", "label": 0, "strength": 1.5}]}, "class strength must be a finite number in [0.0, 1.0]"),
    ({"hooks": [{"type": "exclude", "indices": [1], "strength": 2.5}]}, "exclude strength must be a finite number"),
    ({"hooks": [{"type": "include", "indices": []}]}, "hooks.0.include.indices: List should have at least 1 item"),
    ({"hooks": [{"type": "include", "indices": [5, 120]}]}, "include indices [120] are outside the reference set"),
    ({"hooks": [{"type": "interpolate", "a": [1], "b": [2], "alpha": 2}]}, "interpolate alpha strength must be"),
    ({"hooks": [{"type": "class", "label": 0}] * 9}, "hooks: List should have at most 8 items"),
]


@pytest.mark.parametrize("body,message", BAD_GENERATE, ids=[m[:40] for _, m in BAD_GENERATE])
def test_generate_refuses_bad_input_with_a_message(server, body, message):
    r = server[0].post("/v1/generate", json=body)
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]


def test_generate_refuses_non_json_and_oversized_bodies(server):
    client = server[0]
    r = client.post("/v1/generate", content=b"{n: 3", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["detail"]
    r = client.post("/v1/generate", json={"n": 2, "hooks": [{"type": "include", "indices": [0] * 40000}]})
    assert r.status_code == 413 and f"over {MAX_BODY_BYTES} bytes" in r.json()["detail"]


def test_every_free_text_stage_option_is_classified():
    """A new path option added to a stage must be confined: it has to be listed as a path (or as not one)."""
    for stage in STAGE_SCRIPTS:
        for name, action in stage_options(stage).items():
            if action.nargs != 0 and action.type is None and not action.choices:
                assert action.dest in PATH_OPTIONS | NOT_PATH_OPTIONS, f"{stage} --{name}"


def test_job_options_are_checked_and_paths_confined(server):
    client, workdir, _ = server
    outside = workdir.parent / f"{workdir.name}_outside"
    outside.mkdir(exist_ok=True)
    (workdir / "escape").symlink_to(outside)
    cases = [
        ({"stage": "deploy"}, "stage must be one of"),
        ({"stage": "generate", "options": {"n_smaples": 3}}, "unknown option(s) for stage generate: n_smaples"),
        ({"stage": "generate", "options": {"n_samples": "many"}}, "argument --n_samples: invalid int value: 'many'"),
        ({"stage": "generate", "options": {"sampler": "euler"}}, "invalid choice: 'euler'"),
        ({"stage": "generate", "options": {"cpu": "yes"}}, "option cpu is an on/off flag"),
        ({"stage": "generate", "options": {"n_samples": [1, 2]}}, "option n_samples takes one value"),
        ({"stage": "generate", "options": {"output_dir": "../elsewhere"}}, "'..' is not allowed"),
        ({"stage": "generate", "options": {"output_dir": "/tmp/elsewhere"}}, "outside the server's working directory"),
        ({"stage": "generate", "options": {"output_dir": "escape/pairs"}}, "outside the server's working directory"),
        ({"stage": "extract", "options": {"output_path": str(outside / "f.pt")}}, "outside the server's working"),
        ({"stage": "train", "options": {"ddpm_ckpt": "/etc/passwd"}}, "outside the server's working directory"),
        ({"stage": "generate", "extra": 1}, "extra: Extra inputs are not permitted"),
    ]
    before = client.get("/v1/jobs").json()["jobs"]
    for body, message in cases:
        r = client.post("/v1/jobs", json=body)
        assert r.status_code == 422, (body, r.text)
        assert message in r.json()["detail"], (body, r.json())
    assert client.get("/v1/jobs").json()["jobs"] == before, "a refused job was recorded"
    assert list(outside.iterdir()) == []
    assert client.get("/v1/jobs/nosuchjob").status_code == 404


def test_job_streams_progress_and_logs_to_its_result(server):
    client, workdir, tiny = server
    r = client.post("/v1/jobs", json={"stage": "generate", "options": {**TINY_GENERATE, "output_dir": "pairs_sse"}})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "running" and str(tiny.teacher) in job["command"]  # the served teacher by default
    with client.stream("GET", job["events_url"]) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response)
    kinds = [name for name, _ in events]
    assert kinds[0] == "status" and kinds[-1] == "result" and "error" not in kinds
    progress = [data for name, data in events if name == "progress"]
    assert progress[-1]["step"] == progress[-1]["total"] == 24 and progress[-1]["done"]
    assert progress[-1]["rate"] > 0 and progress[-1]["eta_s"] == 0 and progress[-1]["desc"] == "pairs"
    logs = [data["line"] for name, data in events if name == "log"]
    assert any(line.startswith("generate_training_data: 24 pairs") for line in logs), logs
    final = events[-1][1]
    assert final["status"] == "succeeded" and final["exit_code"] == 0
    assert final["summary"].startswith("generate_training_data: 24 pairs")
    assert (workdir / "pairs_sse" / "training_data.pt").is_file()
    assert client.get(f"/v1/jobs/{job['id']}").json()["progress"]["step"] == 24
    assert job["id"] in [j["id"] for j in client.get("/v1/jobs").json()["jobs"]]
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 409  # finished: nothing to cancel


def test_failed_job_ends_with_the_stages_error_line(server):
    client, _, _ = server
    job = client.post("/v1/jobs", json={"stage": "train", "options": {"data_path": "missing/training_data.pt",
                                                                      "cpu": True}}).json()
    with client.stream("GET", job["events_url"]) as response:
        events = read_events(response)
    name, final = events[-1]
    assert name == "error" and final["status"] == "failed" and final["exit_code"] == 2
    assert "training data not found" in final["error"] or "not found" in final["error"], final["error"]


def test_cancel_stops_the_job_and_leaves_no_output(server):
    client, workdir, _ = server
    options = {**TINY_GENERATE, "n_samples": 5000, "steps": 20, "output_dir": "pairs_cancel"}
    job = client.post("/v1/jobs", json={"stage": "generate", "options": options}).json()
    deadline = time.monotonic() + 60
    while not (client.get(f"/v1/jobs/{job['id']}").json()["progress"] or {}).get("step"):
        assert time.monotonic() < deadline, "no progress within 60 s"
        time.sleep(0.1)
    r = client.delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    assert not (workdir / "pairs_cancel" / "training_data.pt").exists()
    assert client.post(f"/v1/jobs/{job['id']}/resume").json()["status"] == "running"  # cancelled jobs resume
    assert client.delete(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"


def test_server_finds_features_of_its_pair_only(tiny_pipeline, tmp_path):
    from models.io.files import sha256_file
    t, s = sha256_file(tiny_pipeline.teacher), sha256_file(tiny_pipeline.student)
    other = tmp_path / "other.pt"
    other.write_bytes(b"not a checkpoint")
    assert find_features([tmp_path / "missing.pt", other, tiny_pipeline.features], t, s) == tiny_pipeline.features
    assert find_features([tiny_pipeline.features], t, "0" * 64) is None


def test_real_server_killed_mid_job_restarts_and_resumes(tiny_pipeline, tmp_path, repo_root):
    """Over real HTTP on 127.0.0.1: generate, a train job, the server SIGKILLed while it runs; the restarted server
    lists it as interrupted and resumes it (train with --resume) to the end."""
    workdir = tmp_path / "work"
    (workdir / "data").mkdir(parents=True)
    shutil.copy(tiny_pipeline.pairs, workdir / "data" / "training_data.pt")
    args = ["--teacher", tiny_pipeline.teacher, "--student", tiny_pipeline.student, "--features",
            tiny_pipeline.features, "--workdir", workdir, "--cpu"]
    proc, url = start_server(args, tmp_path / "serve1.log", repo_root)
    try:
        r = httpx.post(f"{url}/v1/generate", json={"n": 4, "seed": 3, "top_k": 2}, timeout=30)
        assert r.status_code == 200 and len(r.json()["images"]) == 4
        assert httpx.get(f"{url}/").text.count("/static/app.js") == 1
        # 5 epochs: the kill lands when epoch 1's checkpoint appears, seconds before the run could end
        options = {"data_path": "data/training_data.pt", "output_dir": "student", "epochs": 5, "batch_size": 8,
                   "cpu": True, "no_evaluate": True}
        job = httpx.post(f"{url}/v1/jobs", json={"stage": "train", "options": options}, timeout=30).json()
        deadline = time.monotonic() + 120
        while not (workdir / "student" / "ckpt_epoch_001.pt").exists():
            assert time.monotonic() < deadline, "no epoch checkpoint within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop_server(proc)
    proc, url = start_server(args, tmp_path / "serve2.log", repo_root)
    try:
        record = httpx.get(f"{url}/v1/jobs/{job['id']}").json()
        assert record["status"] == "interrupted" and "resume" in record["error"]
        assert not _process_alive(job["id"], workdir), "the job outlived its server"
        resumed = httpx.post(f"{url}/v1/jobs/{job['id']}/resume", timeout=30).json()
        assert resumed["status"] == "running" and resumed["attempts"] == 2 and resumed["command"][-1] == "--resume"
        with httpx.stream("GET", f"{url}/v1/jobs/{job['id']}/events", timeout=300) as response:
            events = read_events(response)
        assert events[-1][0] == "result" and events[-1][1]["status"] == "succeeded", events[-1]
        logs = [data["line"] for name, data in events if name == "log"]
        assert any(line.startswith("resumed from") for line in logs), logs[-20:]
        assert (workdir / "student" / "ckpt_epoch_005.pt").is_file()
        epochs = [json.loads(line)["epoch"] for line in (workdir / "student" / "stats.jsonl").read_text().splitlines()]
        assert epochs == list(range(1, 6))
    finally:
        stop_server(proc)


def _process_alive(job_id: str, workdir) -> bool:
    """Whether any process still runs with this job's progress file in its environment."""
    needle = str(workdir / "jobs" / job_id).encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if needle in open(f"/proc/{pid}/environ", "rb").read():
                state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    return True
        except OSError:
            continue
    return False


def test_relative_workdir_gives_jobs_absolute_paths(tmp_path, monkeypatch):
    """The stages run with the working directory as their cwd, so nothing handed to them may stay relative."""
    monkeypatch.chdir(tmp_path)
    jobs = JobManager("work", {})
    try:
        assert jobs.workdir == (tmp_path / "work").resolve() and jobs.job_dir("x").is_absolute()
    finally:
        jobs.store.close()


def test_stopping_server_interrupts_its_jobs(tiny_pipeline, tmp_path):
    jobs = JobManager(tmp_path, {"teacher": str(tiny_pipeline.teacher)})
    job = jobs.start("generate", {**TINY_GENERATE, "n_samples": 5000, "steps": 20, "output_dir": "pairs"})
    time.sleep(0.5)
    jobs.shutdown()
    record = JobManager(tmp_path, {}).get(job["id"])  # the next server reads the same records
    assert record["status"] == "interrupted" and record["finished"] and "resume" in record["error"]
    assert not _process_alive(job["id"], tmp_path)


def test_serve_refuses_a_missing_model_and_a_mismatched_pair(tiny_pipeline, tmp_path, repo_root, monkeypatch, capsys):
    """serve.py's __main__ in this interpreter, from the checkout (its default teacher is a relative path); the real
    server process is started by test_real_server_killed_mid_job_restarts_and_resumes."""
    monkeypatch.chdir(repo_root)

    def serve(*args):
        return run_main_in_process(repo_root / "serve.py", args, monkeypatch, capsys)
    code, _, err = serve("--teacher", tmp_path / "no_such_teacher.pt", "--workdir", tmp_path, "--dry-run")
    assert code == 2 and err.startswith("error: ") and "no_such_teacher.pt" in err
    assert len(err.strip().splitlines()) == 1
    code, out, err = serve("--teacher", tiny_pipeline.teacher, "--student", tiny_pipeline.student, "--features",
                           tiny_pipeline.features, "--workdir", tmp_path, "--dry-run", "--cpu")
    assert code == 0 and json.loads(out)["features"] == str(tiny_pipeline.features), err[-2000:]
    code, _, err = serve("--student", tiny_pipeline.student, "--workdir", tmp_path, "--dry-run", "--cpu")
    assert code == 1 and err.startswith("error: "), err
