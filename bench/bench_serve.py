"""serve.py's generate latency over real HTTP: a 16-image request with a class hook and top-5 attribution, timed at
the client (median and best of --repeats after a warm-up), its images checked bitwise against
DirectDecoderPipeline.generate in this process. The server finds (or builds once) the pair's reference features in
--workdir.

    python bench/bench_serve.py --workdir runs/serve_work --cpu
"""
import base64
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import numpy as np
import torch

from models.api import DirectDecoderPipeline
from models.io.cli import ArgumentParser, add_cpu_flag
from models.io.errors import PipelineError, require_extra, run_cli
from models.io.files import require_file
from models.io.paths import DEFAULT_STUDENT, DEFAULT_TEACHER
from models.io.records import append_run_record
from models.server.serving import SERVER_MODULES

REPO = Path(__file__).resolve().parents[1]


def start(args, port: int, log: Path):
    import httpx
    cmd = [sys.executable, str(REPO / "serve.py"), "--port", str(port), "--teacher", args.teacher, "--student",
           args.student, "--workdir", args.workdir] + (["--cpu"] if args.cpu else [])
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    while True:  # the first start may extract the features (minutes); its progress is in the log
        if proc.poll() is not None:
            raise PipelineError(f"serve.py exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(url + "/v1/info", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--teacher", default=DEFAULT_TEACHER, help="teacher checkpoint")
    p.add_argument("--student", default=DEFAULT_STUDENT, help="student checkpoint")
    p.add_argument("--workdir", default="runs/serve_work", help="the server's working directory (features there)")
    p.add_argument("--n", type=int, default=16, help="images per request")
    p.add_argument("--repeats", type=int, default=20, help="timed requests after 3 warm-up ones")
    p.add_argument("--port", type=int, default=8765, help="port of the server started for the bench")
    p.add_argument("--record", default=str(REPO / "bench" / "results" / "serve.jsonl"), help="append results here")
    add_cpu_flag(p)
    args = p.parse_args()
    require_extra(("httpx",), "test", "test")
    require_extra(SERVER_MODULES, "serve", "serve")
    import httpx
    require_file(args.teacher, "teacher checkpoint")
    require_file(args.student, "student checkpoint")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    proc, url = start(args, args.port, Path(args.workdir) / "bench_serve.log")
    try:
        info = httpx.get(url + "/v1/info").json()
        label = info["classes"][3 % len(info["classes"])]
        body = {"n": args.n, "seed": 0, "hooks": [{"type": "class", "label": label, "strength": 0.7}], "top_k": 5,
                "raw": True}
        with httpx.Client(timeout=60) as client:
            for _ in range(3):
                client.post(url + "/v1/generate", json=body).raise_for_status()
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                answer = client.post(url + "/v1/generate", json=body)
                times.append(time.perf_counter() - t0)
                answer.raise_for_status()
        answer = answer.json()
    finally:
        proc.terminate()
        proc.wait()
    pipe = DirectDecoderPipeline.load(args.teacher, args.student, info["features"], device="cpu" if args.cpu else None)
    expected = pipe.generate(args.n, 0, pipe.toward_class(label, 0.7), top_k=5)
    raw = np.frombuffer(base64.b64decode(answer["raw_f32"]), dtype="<f4").reshape(args.n, 1, 28, 28)
    identical = bool(torch.equal(torch.from_numpy(raw.copy()), expected.images.cpu())) and all(
        [t["index"] for t in item["top_k"]] == expected.top_k_indices[i].tolist()
        for i, item in enumerate(answer["images"]))
    record = {"n": args.n, "top_k": 5, "hook": f"class {label} @ 0.7",
              "repeats": args.repeats, "median_s": round(median(times), 4), "best_s": round(min(times), 4),
              "server_compute_s": answer["elapsed_s"], "bitwise_equal_to_pipeline": identical,
              "teacher_sha256": info["teacher_sha256"], "student_sha256": info["student_sha256"],
              "features": info["features"], "n_reference": info["n_reference"],
              "date": time.strftime("%Y-%m-%d")}
    record = append_run_record(record, args.record)
    print(f"bench_serve: {args.n} images + top-5 attribution over HTTP: median {record['median_s'] * 1000:.0f} ms, "
          f"best {record['best_s'] * 1000:.0f} ms over {args.repeats}; bitwise equal to the pipeline: {identical}")
    if not identical:
        raise PipelineError("the served images differ from DirectDecoderPipeline.generate")


if __name__ == "__main__":
    run_cli(main, resumable=False)
