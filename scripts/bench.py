#!/usr/bin/env python3
"""`make bench`: Pleura and the Python peer fleet, side by side, in one run.

Every configuration drains the same pre-filled queue of real 1024² PNGs with
the same model file: the peer (pika + onnxruntime, ../shared/bench/peer) in
fp32 and int8 (its own quantize_int8.py on the very same model.onnx), and
Pleura on tract and on ONNX Runtime, fp32 and its own int8 variant, with K
workers x T threads. Configurations alternate between repetitions, and each
waits for a quiet machine first. Then:

- engine-only throughput with the same threads (`pleura bench engine`), so
  the pipeline's overhead shows;
- per-stage p50/p99 (decode, preprocess, infer, Redis, ack) from each job's
  log line;
- peak RSS of every worker, and cold start to ready (empty queue, one
  worker);
- open-loop latency: Poisson arrivals at 80% of the capacity just measured,
  enqueue -> result p50/p99, against the single-scan service time (one scan
  in flight at a time).

Writes BENCH/results.json and BENCH/report.md and prints the report. Speed
goals live here, never in timed tests; `--quick` (the CI's run) only keeps
this working.
"""
import argparse
import datetime as dt
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

import pika
import redis

AMQP_URL = os.environ.get("PLEURA_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
REDIS_URL = os.environ.get("PLEURA_REDIS_URL", "redis://127.0.0.1:6379/0")

# The goals of issue 11, as ratios or limits.
GOALS = {
    "default_vs_peer_fp32": 1.0,
    "fastest_vs_peer_int8": 1.5,
    "fastest_scans_per_s": 110.0,
    "pipeline_overhead": 0.10,
    "p99_vs_single": 2.0,
    "rss_mb": 300.0,
    "cold_start_s": 3.0,
}


def log(msg):
    print(msg, flush=True)


def percentile(values, q):
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(round(q / 100 * len(v) + 0.5)) - 1))
    return v[k]


def parse_time(s):
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_quiet(max_load, max_wait=600):
    """Waits for the 1-minute load average to drop below `max_load`."""
    t0 = time.time()
    while os.getloadavg()[0] >= max_load and time.time() - t0 < max_wait:
        log(f"  load {os.getloadavg()[0]:.2f} >= {max_load}; waiting")
        time.sleep(15)
    return os.getloadavg()[0]


def peak_rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Bench:
    def __init__(self, args):
        self.a = args
        self.out = os.path.abspath(args.out)
        self.bin = os.path.abspath(args.bin)
        self.redis = redis.Redis.from_url(REDIS_URL)
        self.env = dict(os.environ, PLEURA_AMQP_URL=AMQP_URL, PLEURA_REDIS_URL=REDIS_URL)
        self.pngs = sorted(
            os.path.abspath(os.path.join(d, f))
            for d in (os.path.join(args.data, "cxr", "effusion"), os.path.join(args.data, "cxr", "nofinding"))
            for f in os.listdir(d)
            if f.endswith(".png")
        )

    # ---- set-up ---------------------------------------------------------
    def run(self, cmd, env=None, **kw):
        return subprocess.run(cmd, env=env or self.env, check=True, **kw)

    def prepare(self):
        if os.path.exists(self.out):
            shutil.rmtree(self.out)
        os.makedirs(os.path.join(self.out, "logs"))
        models = os.path.join(self.out, "models")
        log(f"== model: ResNet-18 width {self.a.width} at {self.a.image_size}², trained briefly on the real scans")
        self.run(
            [self.a.trainer, "train", "--data", os.path.join(self.a.data, "cxr"), "--out", models,
             "--epochs", "1", "--width", str(self.a.width), "--image-size", str(self.a.image_size),
             "--seed", "1", "--version", "bench"],
            stdout=subprocess.DEVNULL,
        )
        self.fp32 = os.path.join(models, "bench")
        log("== Pleura's int8 variant (pleura-trainer quantize, calibrated on the training split)")
        self.run(
            [self.a.trainer, "quantize", "--model", self.fp32, "--out", models,
             "--calibration-images", str(self.a.calibration_images)],
            stdout=open(os.path.join(self.out, "quantize.txt"), "w"),
        )
        self.int8 = os.path.join(models, "bench-int8")
        log("== the peer's int8 model (its quantize_int8.py, on the same model.onnx)")
        self.peer_int8 = os.path.join(self.out, "peer-int8.onnx")
        self.run(
            [sys.executable, os.path.join(self.a.peer, "quantize_int8.py"),
             os.path.join(self.fp32, "model.onnx"), self.peer_int8, os.path.join(self.a.data, "cxr")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        # The pre-filled queue: N scans, cycling over the real PNGs.
        self.prefill = os.path.join(self.out, "prefill")
        os.makedirs(self.prefill)
        for i in range(self.a.n):
            os.symlink(self.pngs[i % len(self.pngs)], os.path.join(self.prefill, f"scan_{i:05d}.png"))

    # ---- Pleura ------------------------------------------------------------
    def worker_env(self, ns, cfg, worker_id, port):
        return dict(
            self.env,
            PLEURA_NAMESPACE=ns,
            PLEURA_ENGINE=cfg["engine"],
            PLEURA_INFERENCE_THREADS=str(cfg["threads"]),
            PLEURA_WORKER_ID=worker_id,
            PLEURA_HTTP_ADDR=f"127.0.0.1:{port}",
            PLEURA_LOG_FORMAT="json",
            PLEURA_LOG_LEVEL="info",
        )

    def start_workers(self, ns, cfg, tag):
        """Starts cfg's workers; returns [(proc, port, log path, t_spawn)]."""
        model = self.int8 if cfg["precision"] == "int8" else self.fp32
        out = []
        for k in range(cfg["workers"]):
            port = free_port()
            path = os.path.join(self.out, "logs", f"{tag}.worker{k}.log")
            proc = subprocess.Popen(
                [os.path.join(self.bin, "pleura-worker"), "--model", model],
                env=self.worker_env(ns, cfg, f"{tag}-{k}", port),
                stdout=subprocess.DEVNULL,
                stderr=open(path, "w"),
            )
            out.append((proc, port, path, time.time()))
        return out

    @staticmethod
    def wait_ready(workers, timeout=120):
        """Seconds from spawn to /readyz answering 200, per worker."""
        ready = []
        for proc, port, _, t0 in workers:
            deadline = time.time() + timeout
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"a worker exited with {proc.returncode} before it was ready")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                        if r.status == 200:
                            ready.append(time.time() - t0)
                            break
                except OSError:
                    pass
                if time.time() > deadline:
                    raise SystemExit("a worker did not become ready")
                time.sleep(0.01)
        return ready

    @staticmethod
    def stop_workers(workers):
        for proc, *_ in workers:
            proc.send_signal(signal.SIGTERM)
        for proc, *_ in workers:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def teardown(self, ns):
        subprocess.run(
            [os.path.join(self.bin, "pleura"), "fleet", "teardown", "--confirm", ns],
            env=dict(self.env, PLEURA_NAMESPACE=ns), check=False,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def follow(self, ns, ids, timeout=1800, on_result=None):
        """Reads `{ns}:results` until every id has a result; returns them by id."""
        want, got = set(ids), {}
        last = "0-0"
        deadline = time.time() + timeout
        while want - got.keys():
            if time.time() > deadline:
                raise SystemExit(f"{len(want - got.keys())} results missing after {timeout}s")
            resp = self.redis.xread({f"{ns}:results": last}, count=500, block=1000)
            for _, entries in resp or []:
                for entry_id, fields in entries:
                    last = entry_id
                    result = json.loads(fields[b"result"])
                    if result["job_id"] in want:
                        got[result["job_id"]] = result
                        if on_result:
                            on_result(result)
        return got

    @staticmethod
    def stages_from_logs(paths):
        keys = ("decode_ms", "preprocess_ms", "infer_ms", "write_ms", "ack_ms")
        samples = {k: [] for k in keys}
        for path in paths:
            with open(path) as f:
                for line in f:
                    try:
                        e = json.loads(line)
                    except ValueError:
                        continue
                    if e.get("message") == "job settled" and e.get("outcome") == "ok":
                        for k in keys:
                            samples[k].append(float(e[k]))
        return {
            k: {"p50": percentile(v, 50), "p99": percentile(v, 99)} if v else None
            for k, v in samples.items()
        }

    def pleura_drain(self, cfg, rep):
        tag = f"{cfg['name']}-r{rep}"
        ns = f"bench-{uuid.uuid4().hex[:8]}"
        load = wait_quiet(self.a.max_load)
        log(f"== {tag}: {cfg['workers']} worker(s) x {cfg['threads']} thread(s), {cfg['engine']} {cfg['precision']}, "
            f"{self.a.n} scans (load {load:.2f})")
        try:
            sub = self.run(
                [os.path.join(self.bin, "pleura"), "submit", "--json", self.prefill],
                env=dict(self.env, PLEURA_NAMESPACE=ns), capture_output=True, text=True,
            )
            ids = [json.loads(line)["job_id"] for line in sub.stdout.splitlines() if line.strip()]
            assert len(ids) == self.a.n, f"submitted {len(ids)} of {self.a.n}"
            workers = self.start_workers(ns, cfg, tag)
            try:
                ready = self.wait_ready(workers)
                results = self.follow(ns, ids)
                rss = [peak_rss_mb(p.pid) for p, *_ in workers]
            finally:
                self.stop_workers(workers)
        finally:
            self.teardown(ns)
        done = [parse_time(r["completed_at"]) for r in results.values()]
        received = [parse_time(r["completed_at"]) - r["timings_ms"]["total"] / 1e3 for r in results.values()]
        drain_s = max(done) - min(received)
        ok = sum(r["status"] == "ok" for r in results.values())
        run = {
            "config": cfg["name"], "rep": rep, "n": self.a.n, "ok": ok, "load_at_start": load,
            "drain_s": drain_s, "drain_scans_per_s": self.a.n / drain_s,
            "stages_ms": self.stages_from_logs([w[2] for w in workers]),
            "peak_rss_mb": rss, "ready_s": ready,
        }
        st = run["stages_ms"]
        log(f"  drain {run['drain_scans_per_s']:.1f} scans/s ({drain_s:.1f} s, {ok}/{self.a.n} ok); "
            f"infer p50 {st['infer_ms']['p50']:.1f} ms; peak RSS {max(r or 0 for r in rss):.0f} MB")
        return run

    def cold_start(self, cfg, reps=3):
        """One worker on an empty queue: spawn -> ready, and its RSS once ready."""
        times = []
        for i in range(reps):
            ns = f"bench-cold-{uuid.uuid4().hex[:8]}"
            one = dict(cfg, workers=1)
            workers = self.start_workers(ns, one, f"cold-{cfg['name']}-{i}")
            try:
                times.extend(self.wait_ready(workers))
            finally:
                self.stop_workers(workers)
                self.teardown(ns)
        return statistics.median(times)

    def engine_only(self, cfg):
        model = self.int8 if cfg["precision"] == "int8" else self.fp32
        threads = cfg["workers"] * cfg["threads"]
        out = self.run(
            [os.path.join(self.bin, "pleura"), "bench", "engine", "--model", model, "--engine", cfg["engine"],
             "--threads", str(threads), "--images", str(self.a.engine_images), "--json",
             os.path.join(self.a.data, "cxr")],
            capture_output=True, text=True,
        )
        t = json.loads(out.stdout)["throughput"]
        return {"images_per_s": t["images_per_second"], "p50_ms": t["p50_ms"], "threads": threads}

    def open_loop(self, cfg, capacity):
        """Single-scan service time, then Poisson arrivals at 80% of capacity."""
        ns = f"bench-ol-{uuid.uuid4().hex[:8]}"
        tag = f"openloop-{cfg['name']}"
        workers = self.start_workers(ns, cfg, tag)
        bodies = [open(p, "rb").read() for p in self.pngs]
        try:
            self.wait_ready(workers)
            conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
            ch = conn.channel()
            ch.confirm_delivery()

            def publish(job_id, body):
                ch.basic_publish(
                    exchange=f"{ns}.scans", routing_key="", body=body,
                    properties=pika.BasicProperties(
                        message_id=job_id, delivery_mode=2,
                        headers={"x-pleura-priority": "routine",
                                 "x-pleura-submitted-ms": int(time.time() * 1e3)},
                    ),
                )

            # One scan in flight at a time: what a single scan costs end to end.
            single = []
            for i in range(self.a.single_scans):
                jid = f"{tag}-single-{i}"
                t0 = time.time()
                publish(jid, bodies[i % len(bodies)])
                r = self.follow(ns, [jid], timeout=120)[jid]
                single.append((parse_time(r["completed_at"]) - t0) * 1e3)
            # Open loop: arrival times drawn in advance; latency runs from the
            # scheduled arrival, so a publisher running late cannot hide
            # queueing (no coordinated omission).
            rate = 0.8 * capacity
            rng = random.Random(11)
            arrivals, t = [], 0.0
            while t < self.a.open_loop_s:
                t += rng.expovariate(rate)
                arrivals.append(t)
            ids = [f"{tag}-{i:06d}" for i in range(len(arrivals))]
            sched = {}
            followed = {}
            follower = threading.Thread(
                target=lambda: followed.update(self.follow(ns, ids, timeout=self.a.open_loop_s + 300)))
            follower.start()
            start = time.time() + 0.5
            for i, (jid, at) in enumerate(zip(ids, arrivals)):
                delay = start + at - time.time()
                if delay > 0:
                    time.sleep(delay)
                sched[jid] = start + at
                publish(jid, bodies[i % len(bodies)])
            conn.close()
            follower.join()
            lat = [(parse_time(followed[j]["completed_at"]) - sched[j]) * 1e3 for j in ids]
        finally:
            self.stop_workers(workers)
            self.teardown(ns)
        res = {
            "config": cfg["name"], "rate_per_s": rate, "scans": len(ids),
            "single_p50_ms": statistics.median(single),
            "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
        }
        res["p99_vs_single"] = res["p99_ms"] / res["single_p50_ms"]
        log(f"  open loop {cfg['name']} at {rate:.1f}/s: p50 {res['p50_ms']:.0f} ms, p99 {res['p99_ms']:.0f} ms; "
            f"single scan {res['single_p50_ms']:.0f} ms -> p99 {res['p99_vs_single']:.2f}x")
        return res

    # ---- the peer ----------------------------------------------------------
    @staticmethod
    def purge_peer_queues():
        """Empties the peer's fixed queues, which an interrupted run leaves
        full (peer_bench.py refuses to start on a busy queue)."""
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            for queue in ("peer.scans", "peer.dead"):
                ch = conn.channel()
                try:
                    ch.queue_purge(queue)
                except pika.exceptions.ChannelClosedByBroker:
                    pass  # not declared yet: nothing to purge
        finally:
            conn.close()

    def peer_drain(self, cfg, rep):
        tag = f"{cfg['name']}-r{rep}"
        out = os.path.join(self.out, "peer", tag)
        os.makedirs(out)
        model = self.peer_int8 if cfg["precision"] == "int8" else os.path.join(self.fp32, "model.onnx")
        log(f"== {tag}: peer, {cfg['workers']} worker(s) x {cfg['threads']} thread(s), {cfg['precision']}")
        self.purge_peer_queues()
        self.run(
            [sys.executable, os.path.join(self.a.peer, "peer_bench.py"), "--name", cfg["name"],
             "--workers", str(cfg["workers"]), "--threads", str(cfg["threads"]), "--model", model,
             "-n", str(self.a.n), "--reps", "1", "--max-load", str(self.a.max_load), "--out", out,
             "--data", os.path.join(self.a.data, "cxr")],
            stdout=open(os.path.join(out, "stdout.txt"), "w"),
            # peer_bench.py waits for every result; a peer worker that died
            # (see its log beside stdout.txt) would otherwise hang the run.
            timeout=300 + self.a.n,
        )
        [name] = [f for f in os.listdir(out) if f.endswith(".json") and ".worker" not in f]
        with open(os.path.join(out, name)) as f:
            r = json.load(f)
        run = {
            "config": cfg["name"], "rep": rep, "n": self.a.n, "ok": r["summary"]["n_ok"],
            "load_at_start": r["load_at_start"]["loadavg"][0],
            "drain_s": r["summary"]["drain_s"], "drain_scans_per_s": r["summary"]["drain_scans_per_s"],
            "stage_medians_ms": r["worker_stage_median_ms"],
        }
        log(f"  drain {run['drain_scans_per_s']:.1f} scans/s ({run['drain_s']:.1f} s)")
        return run


def configs(quick):
    c = [
        {"name": "peer-fp32", "peer": True, "precision": "fp32", "workers": 2, "threads": 1},
        {"name": "peer-int8", "peer": True, "precision": "int8", "workers": 2, "threads": 1},
        {"name": "tract-fp32", "engine": "tract", "precision": "fp32", "workers": 2, "threads": 1, "default": True},
        {"name": "tract-fp32-1x2", "engine": "tract", "precision": "fp32", "workers": 1, "threads": 2},
        {"name": "ort-fp32", "engine": "onnxruntime", "precision": "fp32", "workers": 2, "threads": 1},
        {"name": "ort-int8", "engine": "onnxruntime", "precision": "int8", "workers": 2, "threads": 1},
        {"name": "ort-int8-1x2", "engine": "onnxruntime", "precision": "int8", "workers": 1, "threads": 2},
    ]
    if quick:
        c = [x for x in c if x["name"] in ("peer-fp32", "peer-int8", "tract-fp32", "ort-int8")]
    return c


def mean(xs):
    return sum(xs) / len(xs)


def report(res):
    """The markdown report: one table of configurations, one of goals."""
    runs = res["runs"]
    by = {}
    for r in runs:
        by.setdefault(r["config"], []).append(r)
    drain = {k: mean([r["drain_scans_per_s"] for r in v]) for k, v in by.items()}
    peer = {"fp32": drain.get("peer-fp32"), "int8": drain.get("peer-int8")}
    lines = [
        f"# Pleura vs the Python peer ({res['machine']})",
        "",
        f"{res['n']} real 1024² PNGs pre-filled per run, {res['reps']} run(s) per configuration, alternating; "
        f"model: ResNet-18 width {res['width']} at {res['image_size']}² (the same model.onnx for all; "
        f"int8: Pleura's `pleura-trainer quantize`, the peer's `quantize_int8.py`).",
        "",
        "| configuration | drain scans/s (runs) | ÷ peer, same precision | engine-only img/s | overhead | "
        "decode p50/p99 ms | preprocess | infer | Redis | ack | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cfg in res["configs"]:
        name = cfg["name"]
        if name not in by:
            continue
        rs = by[name]
        cells = " / ".join(f"{r['drain_scans_per_s']:.1f}" for r in rs)
        ratio = drain[name] / peer[cfg["precision"]] if peer.get(cfg["precision"]) else None
        eng = res["engine_only"].get(name)
        if cfg.get("peer"):
            m = rs[0]["stage_medians_ms"]
            st = [f"{m['decode_ms']:.1f}", f"{m['preprocess_ms']:.1f}", f"{m['infer_ms']:.1f}",
                  f"{m['redis_ms']:.1f}", f"{m['ack_ms']:.2f}"]
            st = [s + " (p50)" for s in st]
            rss = "-"
        else:
            s = rs[-1]["stages_ms"]
            st = [f"{s[k]['p50']:.1f} / {s[k]['p99']:.1f}" for k in
                  ("decode_ms", "preprocess_ms", "infer_ms", "write_ms", "ack_ms")]
            rss = f"{max(max(x for x in r['peak_rss_mb'] if x) for r in rs):.0f}"
        lines.append(
            f"| {name} | {drain[name]:.1f} ({cells}) | {f'{ratio:.2f}x' if ratio else '-'} | "
            f"{f'{eng:.1f}' if eng else '-'} | {f'{1 - drain[name] / eng:.0%}' if eng else '-'} | "
            + " | ".join(st) + f" | {rss} |"
        )
    lines += ["", "Engine only (`pleura bench engine`, the same threads):", "",
              "| engine, precision | threads | img/s |", "|---|---|---|"]
    for k, v in res["engine_runs"].items():
        lines.append(f"| {k} | {v['threads']} | {v['images_per_s']:.1f} |")
    lines += ["", "| open loop (80% of capacity) | rate/s | single-scan p50 ms | p50 ms | p99 ms | p99 ÷ single |",
              "|---|---|---|---|---|---|"]
    for o in res["open_loop"]:
        lines.append(f"| {o['config']} | {o['rate_per_s']:.1f} | {o['single_p50_ms']:.0f} | {o['p50_ms']:.0f} | "
                     f"{o['p99_ms']:.0f} | {o['p99_vs_single']:.2f}x |")
    lines += ["", "| cold start to ready (one worker, median of 3) | s |", "|---|---|"]
    for k, v in res["cold_start_s"].items():
        lines.append(f"| {k} | {v:.2f} |")

    # Goals.
    g = []
    default = next(c["name"] for c in res["configs"] if c.get("default"))
    if default in drain and peer["fp32"]:
        g.append(("default path (tract fp32) ÷ peer fp32", drain[default] / peer["fp32"], GOALS["default_vs_peer_fp32"], ">="))
    pleura = {k: v for k, v in drain.items() if not k.startswith("peer")}
    fastest = max(pleura, key=pleura.get)
    if peer["int8"]:
        g.append((f"fastest ({fastest}) ÷ peer int8", pleura[fastest] / peer["int8"], GOALS["fastest_vs_peer_int8"], ">="))
    g.append((f"fastest ({fastest}) scans/s", pleura[fastest], GOALS["fastest_scans_per_s"], ">="))
    for k in pleura:
        if k in res["engine_only"]:
            g.append((f"pipeline overhead, {k}", 1 - pleura[k] / res["engine_only"][k], GOALS["pipeline_overhead"], "<="))
    for o in res["open_loop"]:
        g.append((f"p99 at 80% load ÷ single scan, {o['config']}", o["p99_vs_single"], GOALS["p99_vs_single"], "<="))
    rss = [max(x for x in r["peak_rss_mb"] if x) for r in by.get(default, [])]
    if rss:
        g.append(("worker peak RSS MB, tract fp32", max(rss), GOALS["rss_mb"], "<="))
    for k, v in res["cold_start_s"].items():
        g.append((f"cold start to ready s, {k}", v, GOALS["cold_start_s"], "<="))
    lines += ["", "| goal | measured | target | met |", "|---|---|---|---|"]
    for name, v, target, op in g:
        met = v >= target if op == ">=" else v <= target
        fmt = (lambda x: f"{x:.0%}") if "overhead" in name else (lambda x: f"{x:.2f}")
        lines.append(f"| {name} | {fmt(v)} | {op} {fmt(target)} | {'yes' if met else '**no**'} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release", help="folder with pleura and pleura-worker")
    ap.add_argument("--trainer", default="target/debug/pleura-trainer")
    ap.add_argument("--peer", default="../shared/bench/peer")
    ap.add_argument("--data", default=os.environ.get("PLEURA_DATA", "../shared/data"))
    ap.add_argument("--out", default="target/bench")
    ap.add_argument("-n", type=int, default=990, help="scans per drain")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--max-load", type=float, default=0.8)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--calibration-images", type=int, default=64)
    ap.add_argument("--engine-images", type=int, default=300)
    ap.add_argument("--open-loop-s", type=float, default=60)
    ap.add_argument("--single-scans", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="the CI's run: 50 scans, 4 configurations, short phases")
    a = ap.parse_args()
    if a.quick:
        a.n, a.reps, a.open_loop_s, a.single_scans, a.engine_images = 50, 1, 5, 3, 20
        # The peer's worker is fixed at 256² inputs, so only the width shrinks.
        a.width, a.calibration_images, a.max_load = 16, 16, 1e9
    if not os.path.isdir(os.path.join(a.data, "cxr")):
        log(f"bench: SKIPPED, no real scans at {a.data}/cxr (set PLEURA_DATA)")
        return 0
    if not os.path.isfile(os.path.join(a.peer, "peer_bench.py")):
        log(f"bench: SKIPPED, no peer fleet at {a.peer} (pass --peer)")
        return 0
    b = Bench(a)
    b.prepare()
    cfgs = configs(a.quick)
    res = {
        "machine": f"{os.cpu_count()} cores, {os.uname().machine}", "n": a.n, "reps": a.reps,
        "width": a.width, "image_size": a.image_size, "configs": cfgs, "runs": [],
        "engine_only": {}, "engine_runs": {}, "open_loop": [], "cold_start_s": {},
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    for rep in range(1, a.reps + 1):
        order = cfgs if rep % 2 else list(reversed(cfgs))
        for cfg in order:
            run = b.peer_drain(cfg, rep) if cfg.get("peer") else b.pleura_drain(cfg, rep)
            res["runs"].append(run)
    log("== engine only, the same threads")
    for cfg in cfgs:
        if cfg.get("peer"):
            continue
        e = b.engine_only(cfg)
        res["engine_only"][cfg["name"]] = e["images_per_s"]
        res["engine_runs"][f"{cfg['engine']} {cfg['precision']}"] = e
    e = b.engine_only({"engine": "tract", "precision": "int8", "workers": 2, "threads": 1})
    res["engine_runs"]["tract int8"] = e
    log("== cold start, one worker on an empty queue")
    for cfg in cfgs:
        if not cfg.get("peer") and cfg["workers"] == 2:
            res["cold_start_s"][f"{cfg['engine']} {cfg['precision']}"] = b.cold_start(cfg, reps=1 if a.quick else 3)
    log("== open loop")
    pleura = [c for c in cfgs if not c.get("peer")]
    drains = {c["name"]: mean([r["drain_scans_per_s"] for r in res["runs"] if r["config"] == c["name"]])
              for c in pleura}
    default = next(c for c in pleura if c.get("default"))
    fastest = max(pleura, key=lambda c: drains[c["name"]])
    for cfg in [default] + ([fastest] if fastest is not default else []):
        res["open_loop"].append(b.open_loop(cfg, drains[cfg["name"]]))
    with open(os.path.join(b.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = report(res)
    with open(os.path.join(b.out, "report.md"), "w") as f:
        f.write(md)
    print()
    print(md)
    log(f"results: {b.out}/results.json, {b.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
