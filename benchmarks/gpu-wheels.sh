#!/usr/bin/env bash
# The wheels benchmarks/gpu.sh installs on a GPU machine whose image has torch, torchvision, triton and
# transformers but not the serving stack: downloaded here (pip's registry) into .whl/ for Python 3.12 on
# manylinux x86-64, at the versions of requirements/constraints.txt (py-spy, which the lock does not hold, at
# PYSPY). .whl/ is kept out of git through .git/info/exclude; the GPU call carries it (carry: [".whl"]).
#   bash benchmarks/gpu-wheels.sh            # then: the device call with carry [".whl"] runs bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
PYSPY=${PYSPY:-0.4.3}
NAMES="annotated-doc annotated-types anyio av click fastapi fastapi-offline grpcio grpcio-health-checking h11
httptools idna opentelemetry-api protobuf pydantic pydantic-core pydantic-settings python-dotenv python-multipart
starlette typing-extensions typing-inspection uvicorn uvloop"

pins=()
for name in $NAMES; do
    # the lock's pin for this name; where it pins one per Python version, the one for PYTHON_VERSION
    pin=$(python3 - "$name" "$PYTHON_VERSION" <<'EOF'
import re, sys
name, version = sys.argv[1], tuple(int(x) for x in sys.argv[2].split("."))
for line in open("requirements/constraints.txt"):
    m = re.match(rf"^{re.escape(name)}==(\S+)(?:\s*;\s*(.*))?$", line.strip())
    if not m:
        continue
    marker = m.group(2) or ""
    bound = re.search(r"python_full_version\s*(<|>=)\s*'(\d+)\.(\d+)'", marker)
    if bound:
        limit = (int(bound.group(2)), int(bound.group(3)))
        if (version < limit) != (bound.group(1) == "<"):
            continue
    print(f"{name}=={m.group(1)}")
    break
EOF
)
    [ -n "$pin" ] || { echo "gpu-wheels: $name is not in requirements/constraints.txt" >&2; exit 1; }
    pins+=("$pin")
done
pins+=("py-spy==$PYSPY")

rm -rf .whl && mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=()
for n in 28 27 24 17 5; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
    "${platforms[@]}" -d .whl "${pins[@]}"
find .whl -name "*.whl" | wc -l | xargs echo "gpu-wheels: wheels:"
du -sh .whl | cut -f1 | xargs echo "gpu-wheels: size (the device call carries at most 64 MiB with the tree):"
