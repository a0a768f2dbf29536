"""Draw a profile's measured step allocation: per layer, keys and values, every level.

    python benchmarks/allocation_plot.py [--profile kvcodec/profiles/smollm2-135m.json] \
        [--out benchmarks/allocation.png]

Each point is the level's lambda times the group's multiplier (``kvcodec calibrate
--allocation measured``): the group's steps in units where lambda is the profile's geometric
mean of step / RMS, so groups below a level's typical value get finer steps (more bits) than
the Fisher weights alone would give them. Prints the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table  # noqa: E402

from kvcodec.codec.profile import load_profile  # noqa: E402

DEFAULT = Path(__file__).resolve().parents[1] / "kvcodec" / "profiles" / "smollm2-135m.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=str(DEFAULT))
    parser.add_argument("--out", help="write the plot (PNG) here")
    args = parser.parse_args(argv)
    prof = load_profile(args.profile)
    if not prof.allocation:
        print(f"{args.profile}: no measured allocation (calibrated with --allocation fisher?)", file=sys.stderr)
        return 1
    levels = [lv for lv in ("high", "balanced", "compact") if lv in prof.allocation]
    steps = {lv: prof.allocation[lv] * prof.levels[lv] for lv in levels}  # [layers, 2] each
    rows = [[layer] + [f"{m:.3f}" for lv in levels for m in steps[lv][layer]] for layer in range(prof.layers)]
    headers = ["layer"] + [f"{lv} {kind}" for lv in levels for kind in ("keys", "values")]
    print(f"Step multipliers (lambda x allocation) of {args.profile}, sha256 {prof.digest.hex()[:16]}…\n")
    print(markdown_table(headers, rows))
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 4.2))
        x = np.arange(prof.layers)
        for i, lv in enumerate(levels):
            alloc = steps[lv]
            ax.plot(x, alloc[:, 0], "-o", ms=3, color=f"C{i}", label=f"{lv}: keys")
            ax.plot(x, alloc[:, 1], "--s", ms=3, color=f"C{i}", label=f"{lv}: values")
        ax.set_yscale("log", base=2)
        ax.set_xlabel("layer")
        ax.set_ylabel("lambda x multiplier")
        ax.set_title(f"{prof.model}: measured rate-distortion allocation per (layer, keys/values)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=3)
        fig.tight_layout()
        fig.savefig(args.out, dpi=110)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
