"""Times ONNX models on ONNX Runtime's CPU provider in a process of its own (run as a script).

Every latency figure of pass-zoo comes from here. The models run interleaved (a, b, a, b, ...) on one
intra-op thread pool shared by all of them and spinning, as a deployed ONNX Runtime session does
by default: with a pool per session the spinning workers of the session that just finished hold a
core while the next one runs (on 2 cores that nearly doubled ResNet-50's batch-1 latency), and
sleeping workers pay a wake-up per parallel op (1.3 ms of Lite0's 3.2 ms batch-1 run). A shared pool
has neither cost, but ONNX Runtime allows it only for every session of a process -- hence a process
of its own, so that the caller's sessions keep their own settings.

Input (argv[1], JSON): {"models": {name: path}, "input": input name, "img_size": int,
"batches": [int], "threads": int, "repeats": int, "warmup": int}. Output (stdout, JSON):
{"times": {batch: {name: [ms, ...]}}, "thread_pool": str}. Only numpy and onnxruntime are imported.
"""
import json
import sys
import time


def main(spec: dict) -> dict:
    import numpy as np
    import onnxruntime as ort
    from onnxruntime.capi import _pybind_state as ort_c

    threads = int(spec["threads"])
    try:
        ort_c.set_global_thread_pool_sizes(threads, 1)
        shared = True
    except Exception:  # a build without it: one pool per session, sleeping when idle
        shared = False
    sessions = {}
    for name, path in spec["models"].items():
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if shared:
            opts.use_per_session_threads = False
        else:
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions[name] = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    times = {}
    for batch in spec["batches"]:
        size = int(spec["img_size"])
        feed = {spec["input"]: np.random.default_rng(batch).standard_normal((batch, 3, size, size), np.float32)}
        for _ in range(int(spec["warmup"])):
            for s in sessions.values():
                s.run(None, feed)
        times[str(batch)] = runs = {name: [] for name in sessions}
        for _ in range(int(spec["repeats"])):
            for name, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feed)
                runs[name].append((time.perf_counter() - t) * 1000.0)
    return {"times": times, "thread_pool": "shared, spinning" if shared else "per session, sleeping"}


if __name__ == "__main__":
    try:
        result = main(json.loads(sys.argv[1]))
    except Exception as exc:  # one line for the parent's error message
        print(f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500], file=sys.stderr)
        sys.exit(1)
    print(json.dumps(result))
