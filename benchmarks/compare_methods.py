"""Compare the methods on one config: everything else identical, one `dscl run` each.

Prints a Markdown table of test top-1 / Many / Medium / Few and wall time per method, e.g.

    python benchmarks/compare_methods.py --config fashion_mnist_lt --output-dir runs/compare
    python benchmarks/compare_methods.py --config fashion_mnist_lt --methods dscl supcon -- amp=bf16

Arguments after ``--`` are passed to every run as config overrides.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from dscl.methods import method_names


def run_method(config: str, method: str, output_dir: Path, overrides: list[str]) -> dict:
    name = f"{Path(config).stem}_{method.replace('+', '_')}"
    cmd = [
        sys.executable,
        "-m",
        "dscl.cli",
        "run",
        "--config",
        config,
        "--name",
        name,
        "--overwrite",
        f"method={method}",
        f"output_dir={output_dir}",
        "progress=false",
        *overrides,
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    metrics = json.loads((output_dir / name / "metrics.json").read_text())
    return {"method": method, "seconds": seconds} | {
        k: metrics[k] for k in ("top1", "top5", "many", "medium", "few")
    }


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="fashion_mnist_lt")
    parser.add_argument("--methods", nargs="+", default=method_names(), choices=method_names())
    parser.add_argument("--output-dir", type=Path, default=Path("runs/compare"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = []
    for method in args.methods:
        row = run_method(args.config, method, args.output_dir, args.overrides)
        rows.append(row)
        print(f"{method}: top-1 {fmt(row['top1'])} in {row['seconds']:.0f} s", file=sys.stderr)
    print("| method | top-1 | Many | Medium | Few | wall time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['method']} | {fmt(r['top1'])} | {fmt(r['many'])} | {fmt(r['medium'])} | "
            f"{fmt(r['few'])} | {r['seconds']:.0f} s |"
        )


if __name__ == "__main__":
    main()
