"""kernelmesh against a peer: Ray Core, measured in the same run on the same machine.

    python benchmarks/bench_peers.py            # full run
    python benchmarks/bench_peers.py --quick    # smoke run

Needs Ray 2.x (``pip install 'kernelmesh[bench]'``); without it, says so and exits 0.

Rows (tasks per second, best and median of the rounds, ours / Ray's):

  tiny async   relu of 16 float32, N tasks in flight at once: kernelmesh `Client.map`
               (one StreamTasks call) vs Ray tasks submitted with `.remote()` then one
               `ray.get` of them all. Target >= 5x.
  tiny sync    the same task one at a time: `Client.run` vs `ray.get(f.remote(x))`.
               No target (for information).
  matmul 256   256x256 float32 matmul tasks in flight at once: `Client.map` vs Ray tasks
               (`a @ b` in a worker; the arrays go through Ray's object store). No
               target (for information).
  matmul 256 batched   the same against a second kernelmesh server with dynamic
               batching on for matmul (README, "Dynamic batching"). Target >= 10x.

kernelmesh runs as a server in a subprocess (`bench_tasks.py --serve kernelmesh`, warmed
up before timing); Ray as a local cluster of this machine's cores (no dashboard). Every
answer of the first round is checked against NumPy.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_tasks  # noqa: E402  (the kernelmesh server subprocess, as bench_tasks runs it)


@dataclass(frozen=True)
class Settings:
    tiny: int  # tasks per round, async
    tiny_sync: int  # tasks per round, one at a time
    matmul: int  # matmul tasks per round
    rounds: int


FULL = Settings(tiny=5000, tiny_sync=500, matmul=500, rounds=5)
QUICK = Settings(tiny=1000, tiny_sync=100, matmul=100, rounds=3)


@dataclass(frozen=True)
class Row:
    name: str
    ours_best: float
    ours_median: float
    ray_best: float
    ray_median: float
    target: float | None

    @property
    def ratio_best(self) -> float:
        return self.ours_best / self.ray_best

    @property
    def ratio_median(self) -> float:
        return self.ours_median / self.ray_median

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "-"
        return "PASS" if min(self.ratio_best, self.ratio_median) >= self.target else "MISS"


def say(text: str = "") -> None:
    print(text, flush=True)


def rates(tasks: int, rounds: int, run: Callable[[], None]) -> tuple[float, float]:
    """(best, median) tasks per second over `rounds` calls of `run`."""
    per_second = []
    for _ in range(rounds):
        began = time.perf_counter()
        run()
        per_second.append(tasks / (time.perf_counter() - began))
    return max(per_second), statistics.median(per_second)


def check(got: list[np.ndarray], want: list[np.ndarray], what: str) -> None:
    if len(got) != len(want) or not all(
        np.allclose(g, w, rtol=1e-4, atol=1e-4) for g, w in zip(got, want, strict=True)
    ):
        raise RuntimeError(f"{what}: answers differ from NumPy's")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tasks and rounds")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("ray") is None:
        say("bench_peers: skipped, Ray is not installed (pip install 'kernelmesh[bench]')")
        return 0
    import ray

    from kernelmesh.clients import Client

    settings = QUICK if args.quick else FULL
    host = platform.processor() or platform.machine()
    say(f"kernelmesh vs Ray {ray.__version__} on {host} ({os.cpu_count()} cpus)")
    say(f"{settings.rounds} rounds; tasks per second, best and median; ratio = ours / Ray's")

    rng = np.random.default_rng(0)
    tiny = [rng.standard_normal(16).astype(np.float32) for _ in range(settings.tiny)]
    a = rng.standard_normal((256, 256)).astype(np.float32)
    b = rng.standard_normal((256, 256)).astype(np.float32)
    pairs = [(a, b)] * settings.matmul

    servers = bench_tasks.Servers()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        server, batched = servers.get("kernelmesh", "kernelmesh-batched")

        @ray.remote
        def relu(x: np.ndarray) -> np.ndarray:
            return np.maximum(x, 0)

        @ray.remote
        def matmul(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            return x @ y

        rows: list[Row] = []
        with Client(server.target) as km, Client(batched.target) as kmb:
            # warm both sides (Ray's workers start lazily), checking every answer once
            check(km.map("relu", [(x,) for x in tiny]), [np.maximum(x, 0) for x in tiny], "km")
            check(ray.get([relu.remote(x) for x in tiny]), [np.maximum(x, 0) for x in tiny], "ray")
            want = [a @ b]
            check(km.map("matmul", pairs[:1]), want, "kernelmesh matmul")
            check(kmb.map("matmul", pairs[:64]), want * 64, "kernelmesh batched matmul")
            check(ray.get([matmul.remote(a, b)]), want, "Ray matmul")

            def km_tiny() -> None:
                km.map("relu", [(x,) for x in tiny])

            def ray_tiny() -> None:
                ray.get([relu.remote(x) for x in tiny])

            sync = tiny[: settings.tiny_sync]

            def km_sync() -> None:
                for x in sync:
                    km.run("relu", x)

            def ray_sync() -> None:
                for x in sync:
                    ray.get(relu.remote(x))

            def km_matmul() -> None:
                km.map("matmul", pairs)

            def km_batched() -> None:
                kmb.map("matmul", pairs)

            def ray_matmul() -> None:
                ray.get([matmul.remote(x, y) for x, y in pairs])

            def numpy_matmul() -> None:
                for x, y in pairs:
                    np.matmul(x, y)

            for name, tasks, ours, theirs, target in (
                (f"tiny async ({settings.tiny} relu16)", settings.tiny, km_tiny, ray_tiny, 5.0),
                (f"tiny sync ({len(sync)} relu16)", len(sync), km_sync, ray_sync, None),
                (f"matmul 256 ({settings.matmul})", settings.matmul, km_matmul, ray_matmul, None),
                (
                    f"matmul 256 batched ({settings.matmul})",
                    settings.matmul,
                    km_batched,
                    ray_matmul,
                    10.0,
                ),
            ):
                ours_best, ours_median = rates(tasks, settings.rounds, ours)
                ray_best, ray_median = rates(tasks, settings.rounds, theirs)
                rows.append(Row(name, ours_best, ours_median, ray_best, ray_median, target))
            # The compute ceiling: the same matmuls back to back in this process, no RPC,
            # measured right after Ray's matmul rounds so both see the same load.
            ceiling = rates(settings.matmul, settings.rounds, numpy_matmul)
    finally:
        ray.shutdown()
        servers.stop()

    say()
    say(
        f"  {'tasks/s':30} {'km best':>10} {'km median':>10} {'Ray best':>10} {'Ray median':>10}"
        f" {'r.best':>7} {'r.med':>7} {'target':>6} verdict"
    )
    for row in rows:
        target = "-" if row.target is None else f"{row.target:.0f}x"
        say(
            f"  {row.name:30} {row.ours_best:10.0f} {row.ours_median:10.0f} {row.ray_best:10.0f}"
            f" {row.ray_median:10.0f} {row.ratio_best:6.2f}x {row.ratio_median:6.2f}x"
            f" {target:>6} {row.verdict}"
        )
    matmul_ray = next(r for r in rows if r.name.startswith("matmul 256 batched"))
    say(
        f"  ceiling: np.matmul of the same 256x256 pairs in one process, no RPC: "
        f"{ceiling[0]:.0f}/s best, {ceiling[1]:.0f}/s median = "
        f"{ceiling[0] / matmul_ray.ray_best:.1f}x Ray's best, "
        f"{ceiling[1] / matmul_ray.ray_median:.1f}x its median (the most any server could reach)"
    )
    say(
        f"  kernelmesh batched reaches {matmul_ray.ours_best / ceiling[0]:.0%} of the ceiling "
        f"(best), {matmul_ray.ours_median / ceiling[1]:.0%} (median)"
    )
    if ceiling[0] / matmul_ray.ray_best < (matmul_ray.target or 0):
        say(
            f"  the {matmul_ray.target:.0f}x target is above the ceiling on this machine: "
            "no server can meet it here"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
