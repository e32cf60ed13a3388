#!/bin/bash
# A new user's first hour, replayed (issue 30's acceptance): clone this repository into a folder whose path has a
# space, install from scratch, and run the one-line workflow on a dataset the tests never saw (60 IDD-Lite frames in
# the generic folder layout, one label with an out-of-range value):
#   1. a one-line teacher run: the bad label stops it before iteration 1, naming the file; after the fix the SAME
#      command runs (the early-failed folder is set aside, not an obstacle);
#   2. a one-line distillation, then its printed "# repeat:" line verbatim through bash (new folder, original
#      untouched: sha256 compared);
#   3. `c2vkd export --format hf`, then a transformers client (processor, model, post_process_semantic_segmentation)
#      on 4 image sizes / aspect ratios, compared pixel by pixel with `c2vkd predict`'s masks;
#   4. the model card's Reproduce command, verbatim.
# Usage: benchmarks/fresh_clone_trial.sh [IDD_LITE_ROOT]   (default ../shared/data/idd_lite); log on stdout.
# About 25 min on the 2-core machine beside another job (most of it the two live-teacher distillations).
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
SRC=$(realpath "${1:-$REPO/../shared/data/idd_lite}")
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
T="$(mktemp -d)/trial dir"; mkdir -p "$T"; cd "$T"
run() { echo; echo "\$ $*"; timeout 900 "$@"; echo "[exit $?]"; }
git clone -q "$REPO" repo && cd repo && git log --oneline -1
python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 2>/dev/null; echo "[install exit $?]"
export PATH="$PWD/.venv/bin:$PATH"
DS="$T/ds"
python - "$SRC" "$DS" <<'PY'
import json, shutil, sys
from pathlib import Path
import numpy as np
from PIL import Image
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for split, n in (("train", 40), ("val", 10), ("test", 10)):
    names = (src / f"{split}.txt").read_text().split()[:n]
    for sub, ext in (("images", ".jpg"), ("labels", ".png")):
        (dst / sub / split).mkdir(parents=True, exist_ok=True)
        for nm in names:
            shutil.copy(src / sub / split / f"{nm}{ext}", dst / sub / split / f"{nm}{ext}")
    (dst / f"{split}.txt").write_text("\n".join(names) + "\n")
c = json.loads((src / "classes.json").read_text())
json.dump({k: c[k] for k in ("classes", "palette", "ignore_index")}, open(dst / "classes.json", "w"))
bad = dst / "labels" / "train" / f"{(dst / 'train.txt').read_text().split()[5]}.png"
a = np.array(Image.open(bad)); a[:8, :8] = 9; Image.fromarray(a).save(bad)   # 7 classes: 9 is out of range
(dst / "BAD").write_text(str(bad))
print("bad label:", bad)
PY
# 1.
run c2vkd train --model deeplabv3plus_r18 --data "$DS" --iters 30 --out "runs/my teacher"
python -c "
import numpy as np; from PIL import Image
p = open('$DS/BAD').read(); a = np.array(Image.open(p)); a[a == 9] = 255; Image.fromarray(a).save(p)"
run c2vkd train --model deeplabv3plus_r18 --data "$DS" --iters 30 --out "runs/my teacher"
ls "runs/my teacher" "runs/my teacher/failed"
# 2.
run c2vkd distill --teacher "deeplabv3plus_r18=runs/my teacher/student.safetensors" --student segformer_b0 \
  --data "$DS" --iters 30 --out "runs/my student" | tee distill.out
REPEAT=$(grep '^# repeat: ' distill.out | sed 's/^# repeat: //')
echo "repeat line: $REPEAT"
before=$(sha256sum "runs/my student/student.safetensors")
run bash -c "$REPEAT"
echo "original untouched: $([ "$(sha256sum "runs/my student/student.safetensors")" = "$before" ] && echo yes || echo NO)"
# 3.
run c2vkd export "runs/my student" --format hf
mkdir -p imgs
python -c "
from PIL import Image
im = Image.open('$DS/images/test/' + open('$DS/test.txt').read().split()[0] + '.jpg')
for w, h in ((320, 227), (227, 320), (200, 150), (333, 97)): im.resize((w, h)).save(f'imgs/img_{w}x{h}.png')"
run c2vkd predict "runs/my student/config.yaml" --checkpoint "runs/my student/student.safetensors" --input imgs --out preds
python - <<'PY'
import glob, os
import numpy as np, torch
from PIL import Image
from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor
d = "runs/my student/export/hf"
proc = SegformerImageProcessor.from_pretrained(d)
model = SegformerForSemanticSegmentation.from_pretrained(d).eval()
for f in sorted(glob.glob("imgs/*.png")):
    im = Image.open(f).convert("RGB")
    with torch.no_grad():
        out = model(**proc(images=im, return_tensors="pt"))
    seg = proc.post_process_semantic_segmentation(out, target_sizes=[im.size[::-1]])[0].numpy()
    ref = np.array(Image.open("preds/" + os.path.basename(f)[:-4] + "_mask.png"))
    print(f, "WxH", im.size, "agreement with c2vkd predict: %.3f %%" % (100 * (seg == ref).mean()))
PY
# 4.
REPRO=$(awk '/## Reproduce/{f=1} f && /^c2vkd /{print; exit}' "runs/my student/export/hf/README.md")
echo "reproduce line: $REPRO"
run bash -c "$REPRO"
ls runs
