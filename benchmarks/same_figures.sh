#!/usr/bin/env bash
# The same seed gives the same figures as an earlier commit: every number of metrics.json (timings, the
# data's description and the notes' wording aside) and every row of predictions/parent.csv, for the MLP,
# CNN and deep trees on the real six classes.
#
#     bash benchmarks/same_figures.sh REF [DATA] [EPOCHS] [SEED]      e.g. REF = e18aa40, DATA = ../shared/data/cifar100-6
set -euo pipefail
ref=${1:?give the commit to compare with, e.g. e18aa40}
data=$(realpath "${2:-../shared/data/cifar100-6}")
epochs=${3:-2}
seed=${4:-1}
here=$(git rev-parse --show-toplevel)
work=$(mktemp -d)
trap 'git -C "$here" worktree remove --force "$work/old" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git -C "$here" worktree add -q "$work/old" "$ref"
export OMP_NUM_THREADS=1
status=0
for cfg in cifar100-6 cifar100-6-cnn cifar100-6-deep; do
  for tree in old new; do
    root=$here; [ "$tree" = old ] && root=$work/old
    (cd "$root" && python -m branching run --config "configs/$cfg.toml" --data "$data" --no-download \
       --out "$work/$tree-$cfg" --max-epochs "$epochs" --seed "$seed" --quiet --no-report >/dev/null 2>&1)
  done
  python - "$work/old-$cfg" "$work/new-$cfg" "$cfg" <<'PY' || status=1
import json, sys
old, new, name = sys.argv[1:]
a, b = (json.load(open(f"{d}/metrics.json")) for d in (old, new))
differences = []
def compare(x, y, path):  # fields the new version adds are allowed; none may go missing or change
    if isinstance(x, dict) and isinstance(y, dict):
        for key in x:
            if key not in ("timings", "data", "notes", "seconds"):
                compare(x[key], y.get(key, "<missing>"), f"{path}/{key}")
    elif x != y:
        differences.append(path)
compare(a, b, "")
from pathlib import Path
files = sorted(p.relative_to(old) for p in [*Path(old).glob("predictions/*.csv"), Path(old) / "tree.csv"] if p.exists())
changed = [str(f) for f in files if (Path(old) / f).read_text() != (Path(new) / f).read_text()]
print(f"{name}: {'same figures' if not differences else 'DIFFERENT: ' + ', '.join(differences[:5])}; "
      f"{len(files) - len(changed)} of {len(files)} prediction files identical{': ' + ', '.join(changed) if changed else ''}")
sys.exit(bool(differences) or bool(changed))
PY
done
exit $status
