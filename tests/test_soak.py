"""scripts/soak_api.py: its short form against a tiny random model (under a minute: 21 s of mixed concurrent load
between the server's start and the checks that follow it), and its verdict, which fails a run for each thing that
went wrong.

The short run must see every kind of request get its expected status (4xx for each kind of bad request, 401
without a valid key, some 429 in bursts, disconnects), no 5xx, answers under load equal to the same requests'
answers alone, the server idle afterwards (busy 0, waiting 0), its fds and threads back to their idle counts, and
a clean exit on SIGTERM. RSS gets a looser bound than a long run's 5% (the warm-up point of a 21 s run is early).
The context is raised to 2048 so that the disconnect probe's answer (as long as the context allows) lasts over a
second: long enough to tell a freed slot from one that decodes on.
"""
import copy
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=ROOT)


def soak_module():
    spec = importlib.util.spec_from_file_location("soak_api", os.path.join(ROOT, "scripts", "soak_api.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def short_soak(tmp_path_factory, random_tower):
    """(the JSON result, the exit code, the report on stderr, wall seconds) of one short soak."""
    work = tmp_path_factory.mktemp("soak")
    os.symlink(random_tower, work / "random-clip")  # random_model_files takes the session's tower from there
    cmd = [sys.executable, "scripts/soak_api.py", "--size", "tiny", "--minutes", "0.35", "--workdir", str(work),
           "--clients", "4", "--max_batch", "2", "--max_waiting", "2", "--tokens", "8", "--long_tokens", "64",
           "--context", "2048", "--sample_interval", "0.5", "--request_timeout", "60", "--max_rss_growth", "15",
           "--out", str(work / "soak.json")]
    t = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - t
    lines = p.stdout.strip().splitlines()
    assert lines, f"no JSON line (exit {p.returncode}):\n{p.stderr[-4000:]}"
    res = json.loads(lines[-1])
    assert res == json.loads((work / "soak.json").read_text())
    print(f"short soak: {wall:.0f} s wall, {res['total_requests']} requests")
    return res, p.returncode, p.stderr[-3000:], wall


def test_short_soak(short_soak):
    res, rc, report, _ = short_soak
    assert res["count_5xx"] == 0, report
    assert not res["unexpected"], report
    assert not res["missing"], report
    kinds = res["requests"]
    assert set(kinds) == set(res["required"]) and len(kinds) >= 25
    for kind, required in res["required"].items():  # every kind appeared with each status it must get
        assert all(kinds[kind].get(label, 0) > 0 for label in required), (kind, kinds[kind])
    assert set(kinds["missing_key"]) == set(kinds["wrong_key"]) == {"401"}
    assert set(kinds["body_too_large"]) == {"413"} and set(kinds["prompt_too_long"]) == {"400"}
    assert kinds["burst"]["429"] > 0 and kinds["disconnect_stream"]["disconnected"] > 0
    assert kinds["disconnect_nonstream"]["disconnected"] > 0

    answers = res["answers"]
    assert answers["checked"] >= 20 and answers["matched"] == answers["checked"], answers["mismatches"]
    assert res["idle_after_load"]["busy"] == 0 and res["idle_after_load"]["waiting"] == 0
    assert res["most_busy"] <= 2
    start, end = res["server"]["start"], res["server"]["end"]
    assert end["fds"] <= start["fds"] and end["threads"] <= start["threads"], res["server"]
    assert res["checks"]["rss_growth"], res["growth"]
    assert res["server_exit_code"] == 0 and res["server_log_errors"] == 0, res["server_log_first_error"]
    assert res["load_s"] < 0.35 * 60 + 20 and res["clients_still_running"] == 0  # stopped at the deadline
    assert res["machine"]["cores"] == os.cpu_count()
    assert not res["failed"] and res["passed"] and rc == 0, (res["failed"], report)


def test_short_soak_keeps_the_line_within_max_batch_plus_max_waiting(short_soak):
    res = short_soak[0]
    assert res["most_busy"] <= res["slots"] and res["most_in_flight"] <= res["slots"] + res["max_waiting"]
    assert res["checks"]["queue_bounded"]


def test_short_soak_disconnects_free_their_slots(short_soak):
    res = short_soak[0]
    assert [p["verdict"] for p in res["probes"].values()] == ["freed", "freed"], res["probes"]
    assert res["checks"]["idle_after_load"], res["idle_after_load"]  # no dropped answer decodes on after the load


def passing_result():
    """The result of a run where everything went right, as soak_api.measure returns it (the fields checks reads)."""
    return {"count_5xx": 0, "unexpected": {}, "missing": {},
            "answers": {"checked": 40, "matched": 40, "mismatches": []},
            "idle_after_load": {"busy": 0, "waiting": 0, "seconds_to_idle": 0.1},
            "probes": {"stream": {"verdict": "freed"}, "nonstream": {"verdict": "too short to tell"}},
            "most_busy": 2, "slots": 2, "most_waiting": 3, "most_in_flight": 4, "max_waiting": 2,
            "clients_still_running": 0,
            "server_alive_after_load": True, "server_exit_code": 0, "server_log_errors": 0,
            "growth": {"rss_pct_after_warmup": 1.0, "fds_over_idle": 0, "threads_over_idle": -1}}


def test_each_failure_fails_its_check():
    soak = soak_module()
    args = soak.parse_args([])
    assert all(soak.checks(passing_result(), args).values())
    failures = {
        "no_5xx": lambda r: r.update(count_5xx=1),
        "expected_statuses": lambda r: r["unexpected"].update(bad_role={"200": 1}),
        "every_kind_seen": lambda r: r["missing"].update(burst=["429"]),
        "answers_equal": lambda r: r["answers"].update(matched=39, mismatches=[{"prompt": "text-greedy"}]),
        "idle_after_load": lambda r: r["idle_after_load"].update(busy=1, seconds_to_idle=None),
        "disconnect_frees_slot": lambda r: r["probes"]["stream"].update(verdict="NOT freed"),
        "queue_bounded": lambda r: r.update(most_in_flight=5),
        "clients_stopped": lambda r: r.update(clients_still_running=1),
        "server_ok": lambda r: r.update(server_exit_code=-9),
        "rss_growth": lambda r: r["growth"].update(rss_pct_after_warmup=5.5),
        "fds_back_to_idle": lambda r: r["growth"].update(fds_over_idle=1),
        "threads_back_to_idle": lambda r: r["growth"].update(threads_over_idle=2),
    }
    for check, spoil in failures.items():
        res = copy.deepcopy(passing_result())
        spoil(res)
        verdict = soak.checks(res, args)
        assert [name for name, ok in verdict.items() if not ok] == [check], check
    res = passing_result()
    res["growth"]["rss_pct_after_warmup"] = 50
    assert "rss_growth" not in soak.checks(res, soak.parse_args(["--no_growth_check"]))
    assert soak.checks(res, soak.parse_args(["--max_rss_growth", "60"]))["rss_growth"]
