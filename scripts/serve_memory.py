"""Server memory when every request has a new image size: ONNX Runtime's CPU arena on vs off.

Serves one model with a dynamic spatial input (Conv 3->32 3x3 + Relu + GlobalAveragePool,
image FP32 [N, 3, H, W], built here with onnx.helper) from a real tier server on loopback,
sends it 200 requests of 200 different H x W sizes (64..768, binary tensor data), and prints
the server process's resident memory after one warm-up request and after the 200, for three
session settings, each in a fresh server process:

  arena+patterns   ONNX Runtime's defaults (what tierwise did before for every model)
  no-arena         enable_cpu_mem_arena = False only
  tierwise         enable_cpu_mem_arena = False and enable_mem_pattern = False: what
                   `tierwise.runtime.session.session_options` now picks for a model whose
                   input varies beyond the batch

Run: .venv/bin/python scripts/serve_memory.py [--requests 200] [--max-size 768] [--repeat 1]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("arena+patterns", "no-arena", "tierwise")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status (Linux only)")


def spatial_model(path: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(0).normal(0, 0.1, (32, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["conv"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["conv"], ["relu"]),
         helper.make_node("GlobalAveragePool", ["relu"], ["gap"]),
         helper.make_node("Flatten", ["gap"], ["features"])],
        "spatial", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 32])],
        [numpy_helper.from_array(weights, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def serve(mode: str) -> None:
    """The server process: serve the model with `mode`'s session settings; print the URL,
    then serve until stdin closes."""
    import onnxruntime as ort

    from tierwise.config import TierConfig
    from tierwise.runtime.session import OnnxModel, describe_onnx, session_options
    from tierwise.server.app import create_app, serve_in_thread

    path = Path(tempfile.mkdtemp(prefix="serve-memory-")) / "model.onnx"
    spatial_model(path)
    model = OnnxModel(path, describe_onnx(path, "spatial"))  # tierwise's own choice
    if mode != "tierwise":
        options = session_options(model.info)
        options.enable_cpu_mem_arena = mode == "arena+patterns"
        options.enable_mem_pattern = True
        model.session = ort.InferenceSession(str(path), sess_options=options,
                                             providers=["CPUExecutionProvider"])
    app = create_app("edge", TierConfig(max_body_bytes=64 * 1024 * 1024), {"spatial": model})
    with serve_in_thread(app) as url:
        print(url, flush=True)
        sys.stdin.read()


def measure(mode: str, requests: int, max_size: int) -> str:
    """Start a server process in `mode`, send it `requests` new sizes, report its memory."""
    import httpx
    import numpy as np

    from tierwise.protocol.oip import encode_infer_request

    rng = np.random.default_rng(1)
    sizes: list[tuple[int, int]] = []
    while len(sizes) < requests:  # distinct sizes: each one new to the session
        size = (int(rng.integers(64, max_size + 1)), int(rng.integers(64, max_size + 1)))
        if size not in sizes:
            sizes.append(size)
    server = subprocess.Popen([sys.executable, __file__, "--serve", mode],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        with httpx.Client(base_url=url, timeout=120) as client:
            def send(height: int, width: int) -> None:
                image = rng.random((1, 3, height, width), dtype=np.float32)
                body, headers = encode_infer_request({"image": image}, binary=True)
                client.post("/v2/models/spatial/infer", content=body,
                            headers=headers).raise_for_status()

            send(64, 64)
            before = rss_mib(server.pid)
            started = time.perf_counter()
            marks = []
            for index, (height, width) in enumerate(sizes, 1):
                send(height, width)
                if index % 50 == 0:
                    marks.append(f"{rss_mib(server.pid):.0f}")
            seconds = time.perf_counter() - started
            after = rss_mib(server.pid)
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=30)
    return (f"{mode:15s} server RSS before {before:5.0f} MiB  after {after:5.0f} MiB  "
            f"(every 50: {', '.join(marks)})  {seconds:5.1f} s for {requests} requests")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-size", type=int, default=768)
    parser.add_argument("--repeat", type=int, default=1, help="measure every mode this often")
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    print(f"{args.requests} requests, each a new H x W in 64..{args.max_size}, one image each; "
          "a fresh server process per line")
    for _ in range(args.repeat):
        for mode in MODES:
            print(measure(mode, args.requests, args.max_size), flush=True)


if __name__ == "__main__":
    main()
