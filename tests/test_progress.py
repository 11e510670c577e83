"""Progress output: plain, paced lines when stderr is a file (overnight logs), JSON records for the job server."""
from __future__ import annotations

import json
import subprocess
import sys

from helpers import subprocess_env
from models.io.progress import progress_line

BAR_SCRIPT = """
import time
from models.io.progress import progress_bar
bar = progress_bar(total=40, desc="pairs", unit="pair")
for step in range(40):
    time.sleep(0.01)
    bar.update(1)
    bar.set_postfix(loss=f"{1 / (step + 1):.4f}")
bar.close()
print("summary line", flush=True)
"""


def run_bar(tmp_path, **env) -> str:
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-c", BAR_SCRIPT], env={**subprocess_env(), **env}, stdout=f,
                              stderr=subprocess.STDOUT, timeout=120)
    assert proc.returncode == 0
    return log.read_text()


def test_a_log_file_gets_a_first_and_last_line_not_redraws(tmp_path):
    text = run_bar(tmp_path, DIRECT_DECODER_LOG_INTERVAL="3600")
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 3, text  # the start, the end, the script's own summary
    assert lines[0].startswith("pairs: 0/40 (0%)") and "ETA" in lines[0]
    assert " pair/s, " in lines[1]  # the bar's own unit
    assert lines[1].startswith("pairs: 40/40 (100%)") and "done" in lines[1] and lines[1].endswith("loss 0.025")
    assert lines[2] == "summary line"


def test_the_interval_paces_the_lines(tmp_path):
    every = run_bar(tmp_path, DIRECT_DECODER_LOG_INTERVAL="0").splitlines()
    assert 40 <= len(every) <= 90 and all(line.startswith("pairs: ") for line in every[:-1])
    steps = [int(line.split()[1].split("/")[0]) for line in every[:-1]]
    assert steps == sorted(steps) and steps[-1] == 40


def test_the_job_server_channel_is_unchanged(tmp_path):
    channel = tmp_path / "progress.jsonl"
    text = run_bar(tmp_path, DIRECT_DECODER_PROGRESS_FILE=str(channel))
    assert text.splitlines() == ["summary line"]  # nothing drawn: the records go to the channel
    records = [json.loads(line) for line in channel.read_text().splitlines()]
    assert records[-1]["done"] and records[-1]["step"] == records[-1]["total"] == 40
    assert records[-1]["loss"] == 0.025 and records[-1]["desc"] == "pairs"


def test_progress_line_format():
    record = {"desc": "image encoder", "step": 120, "total": 300, "rate": 2.3149, "eta_s": 77.8, "elapsed_s": 51.2,
              "loss": 0.021734, "done": False}
    assert progress_line(record) == "image encoder: 120/300 (40%), 2.31 step/s, 0:51 elapsed, ETA 1:18, loss 0.02173"
    done = {**record, "step": 300, "eta_s": 0.0, "elapsed_s": 3725.0, "loss": None, "done": True, "desc": ""}
    assert progress_line(done) == "300/300 (100%), 2.31 step/s, 1:02:05 elapsed, done"
    unknown = {**record, "total": None, "rate": None, "eta_s": None}
    assert progress_line(unknown) == "image encoder: 120, 0:51 elapsed, loss 0.02173"
    assert progress_line(record, unit="img").startswith("image encoder: 120/300 (40%), 2.31 img/s, ")
