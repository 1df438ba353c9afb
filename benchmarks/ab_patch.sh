#!/usr/bin/env bash
# A/B of a patch against this checkout, in one GPU call: `old` is the checkout as it is, `new` the checkout with
# PATCH applied (`git diff main BRANCH > PATCH`), each installed into its own folder as a user's `pip install .`
# lays it out. Then, by a deadline:
#   1. `pytest -m gpu -k "$TESTS"` on new (if TESTS is set: the patch's own GPU tests);
#   2. benchmarks/profile_forward.py --size 8B --t 1 per format in FORMATS, one process per run, in ORDER
#      (default old new new old: each variant twice, alternating, so drift shows as disagreement between runs);
#   3. a table of ms/forward and kernels/forward per run.
# Logs and profiles go to $OUT/ab/ and come back as one tarball, $OUT/ab.tgz, also when the deadline cuts a step.
#   run (device tool; carry .whl, and the patch too if git does not track it):
#     bash benchmarks/ab_patch.sh docs/pending/grouped_queries.patch
#   env: TESTS (pytest -k expression), FORMATS (default "bf16 int4"), ORDER, DEADLINE (seconds, default 500)
set -u
PATCH=$(realpath "${1:?usage: ab_patch.sh PATCH}")
D=${DEADLINE:-500}
cap() { local c=$1 l=$((D - SECONDS - 10)); [ "$l" -lt "$c" ] && c=$l; [ "$c" -lt 1 ] && c=1; echo "$c"; }
A=$OUT/ab
mkdir -p "$A"
export PYTHONUNBUFFERED=1
finish() { echo "done at ${SECONDS}s"; (cd "$OUT" && tar czf ab.tgz ab && rm -rf ab); }
trap finish EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
mkdir -p /tmp/ab_old && tar cf - --exclude=./.whl --exclude=./out --exclude=./.git . | tar xf - -C /tmp/ab_old \
  && cp -r /tmp/ab_old /tmp/ab_new && (cd /tmp/ab_new && patch -p1 -s < "$PATCH") \
  || { echo "copy or patch failed"; exit 1; }
for X in old new; do
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site_$X /tmp/ab_$X \
    || { echo "install $X failed"; exit 1; }
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$A/gpu.txt"
echo "setup done at ${SECONDS}s"
if [ -n "${TESTS:-}" ]; then
  (export PYTHONPATH=/tmp/site_new:/tmp/site XLA_PYTHON_CLIENT_PREALLOCATE=false; cd /tmp/ab_new
   timeout "$(cap 200)" python3 -P -m pytest -m gpu -q -k "$TESTS" tests > "$A/tests_new.log" 2>&1
   echo "tests rc $? at ${SECONDS}s"; tail -2 "$A/tests_new.log")
fi
for fmt in ${FORMATS:-bf16 int4}; do
  i=0
  for X in ${ORDER:-old new new old}; do
    i=$((i + 1))
    [ $SECONDS -gt $((D - 50)) ] && { echo "skipped $X $fmt (deadline)"; continue; }
    (export PYTHONPATH=/tmp/site_$X:/tmp/site; cd /tmp/ab_$X
     timeout "$(cap 60)" python3 -P benchmarks/profile_forward.py --size 8B --format "$fmt" --t 1 \
       --out "$A/prof_${fmt}_${i}_$X.txt" > /dev/null 2> "$A/err_${fmt}_${i}_$X.txt")
  done
done
for f in "$A"/prof_*.txt; do
  [ -e "$f" ] || continue
  ms=$(head -1 "$f" | sed -n 's/.*: \([0-9.]*\) ms\/forward.*/\1/p')
  kernels=$(grep -m1 -- "-- kernels: " "$f" | sed -n 's/.*, \([0-9]*\) events\/forward/\1/p')
  echo "$(basename "$f" .txt)  ${ms} ms/forward  ${kernels} kernels/forward"
done
