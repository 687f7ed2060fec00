"""A warm SuperExec for a SuperNode: ClientApp tasks run in forked, pre-imported processes.

Flower's SuperNode runs each ClientApp message in a fresh `flwr-clientapp` process (its
default `subprocess` isolation). That process imports Flower, torch and the app, about 2.3 s of
CPU here, for every client and every round: with ten clients on two cores it alone would cost
~12 s per round, more than the training. Flower's `process` isolation lets the SuperExec run
outside the SuperNode; this module is that SuperExec. It is Flower's own `run_superexec` loop
with one change of executor: instead of spawning a new interpreter per task, it forks a child
of this warm process (Flower, torch, our app and the dataset already loaded) and the child
runs Flower's `run_clientapp` for that task's token, exactly as `flwr-clientapp` would. Each
task still gets its own process, so one task's crash or exit cannot take down the next.

Run: `python -m tierwise.learn.executor --runtime-api-address 127.0.0.1:PORT [--data-dir D]`
(the SuperNode started with `--isolation process --port PORT`).
"""

from __future__ import annotations

import argparse
import os

from flwr.supercore.constant import ExecutorType, TaskType
from flwr.supercore.superexec import run_superexec as superexec_module
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

POLL_INTERVAL_S = "0.5"  # Flower's default is 1 s between task polls


class ForkExecutor(SubprocessExecutor):
    """Launch ClientApp tasks as forks of this warm process; anything else as Flower does."""

    def __init__(self) -> None:
        super().__init__()
        self.children: set[int] = set()

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP:
            return super().launch(spec)
        pid = os.fork()
        if pid == 0:  # the child: one ClientApp task, then exit without running our handlers
            code = 1
            try:
                from flwr.supernode.runtime.run_clientapp import run_clientapp

                run_clientapp(runtime_api_address=spec.runtime_api_address, token=spec.token,
                              insecure=spec.insecure, parent_pid=spec.parent_pid)
                code = 0
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else 0
            finally:
                os._exit(code)
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        for pid in list(self.children):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                self.children.discard(pid)


def warm_up(data_dir: str | None, validation_size: int, seed: int) -> None:
    """Import what every task needs and load the dataset, so forks start with them."""
    import torch

    from tierwise.learn.flower_app import client_data  # the app module each task loads
    from tierwise.learn.model import fedavg_cnn, local_train

    torch.set_num_threads(1)
    images, labels = client_data(data_dir or "", validation_size, seed)
    # one tiny step, so torch's lazy set-up (kernels, allocator) is done before any fork
    local_train(fedavg_cnn(), images[:8], labels[:8], steps=1, batch_size=4, learning_rate=0.01)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--validation-size", type=int, default=5000)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", POLL_INTERVAL_S)
    warm_up(args.data_dir, args.validation_size, args.data_seed)
    executor = ForkExecutor()
    # Flower's loop, with our executor in place of the one `get_executor` would build
    superexec_module.get_executor = lambda *a, **k: executor
    superexec_module.run_superexec(
        runtime_api_address=args.runtime_api_address, insecure=True,
        parent_pid=args.parent_pid, executor_type=ExecutorType.SUBPROCESS)


if __name__ == "__main__":
    main()
