#!/usr/bin/env bash
# The worker's hot path in two code trees, side by side: `benchmarks.micro` run in each tree
# in turn (old, new, new, old, ...), then the median over the runs of each run's CPU median.
#   benchmarks/micro_ab.sh OLD_TREE NEW_TREE PAIRS OUTDIR
set -eu
[ $# -eq 4 ] || { echo "usage: $0 OLD_TREE NEW_TREE PAIRS OUTDIR" >&2; exit 2; }
python="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
old=$(realpath "$1") new=$(realpath "$2") pairs=$3 out=$4
mkdir -p "$out"
run() { (cd "$1" && PYTHONPATH="$1" "$python" -m benchmarks.micro --events 10000 --repeats 5 --json "$out/$2-$3.json" >/dev/null); }
for i in $(seq 1 "$pairs"); do
  if [ $((i % 2)) -eq 1 ]; then run "$old" old "$i"; run "$new" new "$i"; else run "$new" new "$i"; run "$old" old "$i"; fi
done
"$python" - "$out" <<'PY'
import glob, json, statistics, sys

def runs(tag: str) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {}
    for path in sorted(glob.glob(f"{sys.argv[1]}/{tag}-*.json")):
        for row in json.load(open(path))["results"]:
            found.setdefault(row["name"], []).append(row["cpu_median_us"])
    return found

old, new = runs("old"), runs("new")
for name, before in old.items():
    if name in new:
        a, b = statistics.median(before), statistics.median(new[name])
        print(f"{name:34s} old {a:7.2f}  new {b:7.2f}  new/old {b / a:5.2f}  "
              f"(old {min(before):.2f}-{max(before):.2f}, new {min(new[name]):.2f}-{max(new[name]):.2f})")
PY
