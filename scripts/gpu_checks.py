"""The checks of scripts/gpu-check, run against a real torchfn-local on a real GPU.

    python scripts/gpu_checks.py --bin DIR --fixtures DIR

DIR holds torchfn-local; the fixtures are what tests/fixtures/make_fixtures.py wrote (the
reference answers in reference.json are Python torch's, on the CPU). Each check starts a
server on loopback ports chosen by the OS, talks to it over HTTP and stops it:

  1. device selection: `--device auto` puts the model on cuda:0 (describe says deviceType
     gpu, deviceIds [0]; the load log says Cuda(0)) and answers as Python torch does;
  2. a batched forward on CUDA: concurrent requests are answered from one batch
     (x-torchfn-batch-size > 1), each answer equal to Python torch's;
  3. reduced precision: torchfn_precision=fp16 (autocast) and bf16 load in that precision
     (the log says so) and answer within that precision's tolerance of float32.

Prints one line per check and exits 1 when any fails. Standard library only.
"""

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor


class Server:
    """A torchfn-local serving one model, its stdout and JSON log lines collected."""

    def __init__(self, bin_dir, store, model, mar, handler=None, device="auto", **config):
        self.dir = tempfile.mkdtemp(prefix="torchfn-gpu-check-")
        props = {
            "inference_address": "http://127.0.0.1:0",
            "management_address": "http://127.0.0.1:0",
            "metrics_address": "http://127.0.0.1:0",
            "default_workers_per_model": "1",
            "job_queue_size": "100",
        }
        props.update({k: str(v) for k, v in config.items()})
        path = os.path.join(self.dir, "config.properties")
        with open(path, "w") as f:
            f.write("".join(f"{k}={v}\n" for k, v in props.items()))
        cmd = [os.path.join(bin_dir, "torchfn-local"), "--model-store", store,
               "--models", f"{model}={mar}", "--ts-config", path, "--device", device,
               "--log-json"]
        if handler:
            cmd += ["--handler", f"{model}={handler}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHFN_")}
        env["RUST_LOG"] = "info"
        self.proc = subprocess.Popen(cmd, cwd=self.dir, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines = queue.Queue()
        self.logs = []
        threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True).start()
        self.inference = self.management = None
        deadline = time.monotonic() + 180
        while self.inference is None or self.management is None:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("torchfn-local did not bind:\n" + self.tail())
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            for what in ("Inference", "Management"):
                prefix = f"{what} API bind to: "
                if line.startswith(prefix):
                    setattr(self, what.lower(), line[len(prefix):].strip())
        while True:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("torchfn-local did not become healthy:\n" + self.tail())
            try:
                if self.get(self.inference + "/ping")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)

    def _read(self, stream, stdout):
        for line in stream:
            if stdout:
                self.lines.put(line.rstrip("\n"))
            else:
                self.logs.append(line.rstrip("\n"))

    def events(self, message):
        """The log events whose message is `message`, as dicts of their fields."""
        found = []
        for line in list(self.logs):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            fields = event.get("fields", event)
            if fields.get("message") == message:
                found.append(fields)
        return found

    def tail(self):
        return "\n".join(self.logs[-20:])

    @staticmethod
    def get(url):
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()

    def predict(self, model, body):
        req = urllib.request.Request(f"{self.inference}/predictions/{model}",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read()), int(r.headers.get("x-torchfn-batch-size", "0"))
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace"), 0

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def max_diff(a, b):
    """Largest absolute difference between two equally shaped nested lists of numbers."""
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (a, b)
        return max((max_diff(x, y) for x, y in zip(a, b)), default=0.0)
    return abs(float(a) - float(b))


def check_device_selection(bin_dir, fx, ref):
    s = Server(bin_dir, fx["store"], "classifier", "classifier.mar", handler="classifier")
    try:
        status, body = s.get(f"{s.management}/models/classifier")
        described = json.loads(body)[0]
        assert status == 200 and described.get("deviceType") == "gpu", described
        assert described.get("deviceIds") == [0], described
        loaded = s.events("TorchScript module loaded")
        assert loaded and "Cuda(0)" in str(loaded[0].get("device")), loaded
        status, answer, _ = s.predict("classifier", {"features": ref["seed_features"]})
        assert status == 200, answer
        want = ref["classifier_single"]
        assert answer["predicted_class"] == want["predicted_class"], (answer, want)
        d = max_diff(answer["probabilities"], want["probabilities"])
        assert d < 1e-4, f"probabilities differ from Python torch's by {d}"
        return f"--device auto chose cuda:0 (describe: deviceType gpu, deviceIds [0]); the answer equals Python torch's (max |diff| {d:.1e})"
    finally:
        s.stop()


def check_batched_forward(bin_dir, fx, ref):
    n = 8
    out = []
    for model, mar, handler, body, want, tol in (
        ("classifier", "classifier.mar", "classifier", {"features": ref["seed_features"]},
         ref["classifier_single"]["probabilities"], 1e-4),
        ("wide", "wide.mar", None, ref["wide_input"], ref["wide_single"], 1e-3),
    ):
        s = Server(bin_dir, fx["store"], model, mar, handler=handler, device="cuda",
                   batch_size=n, max_batch_delay=1000)
        try:
            with ThreadPoolExecutor(n) as pool:
                answers = list(pool.map(lambda _: s.predict(model, body), range(n)))
            sizes = []
            for status, answer, size in answers:
                assert status == 200, answer
                got = answer["probabilities"] if model == "classifier" else answer
                d = max_diff(got, want)
                assert d < tol, f"{model}: an answer differs from Python torch's by {d}"
                sizes.append(size)
            assert max(sizes) > 1, f"{model}: no batch formed (batch sizes {sizes})"
            out.append(f"{model}: {n} concurrent requests answered in batches of {sorted(set(sizes))}")
        finally:
            s.stop()
    return "; ".join(out) + ", each equal to Python torch's"


def check_precision(bin_dir, fx, ref):
    out = []
    for precision, kind, tol in (("fp16", "Fp16", 5e-2), ("bf16", "Bf16", 2e-1)):
        s = Server(bin_dir, fx["store"], "wide", "wide.mar", device="cuda",
                   torchfn_precision=precision)
        try:
            loaded = s.events("TorchScript module loaded")
            assert loaded and loaded[0].get("precision") == kind, loaded
            status, answer, _ = s.predict("wide", ref["wide_input"])
            assert status == 200, answer
            d = max_diff(answer, ref["wide_single"])
            scale = max(abs(x) for x in ref["wide_single"])
            assert d <= tol * max(scale, 1.0), f"{precision}: differs from float32 by {d} (largest output {scale:.3g})"
            out.append(f"{precision} loaded as {kind}, max |diff| vs float32 {d:.2e} (largest output {scale:.3g})")
        finally:
            s.stop()
    return "; ".join(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin", required=True)
    p.add_argument("--fixtures", required=True)
    a = p.parse_args()
    fx = {"store": os.path.join(a.fixtures, "store")}
    with open(os.path.join(a.fixtures, "reference.json")) as f:
        ref = json.load(f)
    failed = 0
    for name, check in (("device selection", check_device_selection),
                        ("batched forward on CUDA", check_batched_forward),
                        ("fp16 / bf16", check_precision)):
        t = time.monotonic()
        try:
            said = check(a.bin, fx, ref)
            print(f"gpu-check: PASS {name}: {said} ({time.monotonic() - t:.1f} s)", flush=True)
        except Exception as e:  # every failure is reported, then the next check runs
            failed += 1
            print(f"gpu-check: FAIL {name}: {e}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
