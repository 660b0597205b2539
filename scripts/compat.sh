#!/usr/bin/env bash
# The support matrix (docs/compat.md): each cell is a Python, a torch and a megatron-core. Builds what is missing
# (cached under .cache/compat: one venv per cell, the Debian 13 root for Python 3.13), runs the `compat` test subset
# in each cell, saves the pickles that cell's Python writes (tests/formats/pickle_samples), and writes compat.json
# and the table in docs/compat.md.
#
#   scripts/compat.sh [--cells NAME,...] [--list]        (or: make compat)
#
# Cells whose interpreter is missing here are reported as such (and make the run fail); so does a failing test.
# COMPAT_PYTEST_ARGS adds pytest options (e.g. -x); COMPAT_REBUILD=1 rebuilds every venv.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
CACHE=.cache/compat
ROOT313=$CACHE/trixie
mkdir -p "$CACHE/results"
export PIP_DISABLE_PIP_VERSION_CHECK=1 OMP_NUM_THREADS=1

say() { echo "[compat] $*" >&2; }

# The pyenv (or other non-system) 3.11 that CI uses: the first python3.11 on PATH outside /usr/bin, else pyenv's.
ci_python() {
    local p
    for p in $(type -ap python3.11 python3) "$HOME"/.pyenv/versions/3.11*/bin/python3.11; do
        [ -x "$p" ] || continue
        case "$(readlink -f "$p")" in /usr/bin/*) continue;; esac
        "$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null && { echo "$p"; return; }
    done
}

# name | interpreter ("root:PYTHON" runs inside the Debian 13 root) | torch requirement | what it proves
CELLS=(
    "py3.11-ci|$(ci_python)|torch==2.13.0|CI's interpreter, the CPU wheel of the range's lower end, megatron-core 0.16.1"
    "py3.11-system|/usr/bin/python3|torch==2.13.0|Debian 12's own python3 (3.11.2: enums pickled through getattr)"
    "py3.11-torch2.14|$(ci_python)|torch==2.14.1|the range's upper end on Python 3.11 (the CUDA build, run on the CPU)"
    "py3.13-mcore0.19|root:python3.13|torch>=2.13,<2.15|Debian 13, PyPI's newest torch in range, megatron-core 0.19.x"
)

list_only=0; wanted=""
while [ $# -gt 0 ]; do
    case "$1" in
        --list) list_only=1;;
        --cells) wanted=$2; shift;;
        --cells=*) wanted=${1#--cells=};;
        -h|--help) sed -n 2,11p "$0"; exit 0;;
        *) say "unknown option $1"; exit 2;;
    esac
    shift
done
if [ $list_only = 1 ]; then
    for c in "${CELLS[@]}"; do IFS='|' read -r n p t w <<<"$c"; printf '%-18s %-28s %-20s %s\n' "$n" "${p:-<missing>}" "$t" "$w"; done
    exit 0
fi

stamp() { sha256sum pyproject.toml | cut -c1-16; echo "$1"; }

# Build (once) the venv of a cell; prints nothing, fails with the reason.
build_host_venv() {  # venv python torch log
    local venv=$1 py=$2 torch=$3 log=$4
    if [ "${COMPAT_REBUILD:-0}" != 1 ] && [ "$(cat "$venv/.installed" 2>/dev/null)" = "$(stamp "$torch")" ]; then
        return 0
    fi
    say "building $venv ($py, $torch; log: $log)"
    rm -rf "$venv"
    { "$py" -m venv "$venv" && "$venv/bin/python" -m pip install -q --upgrade pip \
        && "$venv/bin/python" -m pip install -q "$torch" && "$venv/bin/python" -m pip install -q -e ".[test]"; } \
        >"$log" 2>&1 && stamp "$torch" > "$venv/.installed" || { tail -5 "$log" >&2; return 1; }
}

build_root_venv() {  # torch log
    scripts/debian_root.sh build "$ROOT313" trixie python3.13 >&2 || return 1
    if [ "${COMPAT_REBUILD:-0}" != 1 ] && [ "$(cat "$ROOT313/opt/venv/.installed" 2>/dev/null)" = "$(stamp "$1")" ]; then
        return 0
    fi
    say "building the Python 3.13 venv in $ROOT313 (log: $2)"
    rm -rf "$ROOT313/opt/venv"
    scripts/debian_root.sh run "$ROOT313" -- bash -c "python3.13 -m venv /opt/venv \
        && /opt/venv/bin/pip install -q --upgrade pip && /opt/venv/bin/pip install -q '$1' \
        && /opt/venv/bin/pip install -q -e '.[test]'" >"$2" 2>&1 && stamp "$1" > "$ROOT313/opt/venv/.installed" \
        || { tail -5 "$2" >&2; return 1; }
}

VERSIONS='import json, platform, torch, megatron.core, transformers
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__,
                  "megatron_core": megatron.core.__version__, "transformers": transformers.__version__}))'

status=0
for c in "${CELLS[@]}"; do
    IFS='|' read -r name py torch what <<<"$c"
    if [ -n "$wanted" ] && [[ ",$wanted," != *",$name,"* ]]; then continue; fi
    result=$CACHE/results/$name.json
    t0=$(date +%s)
    if [ -z "$py" ]; then
        say "$name: no such interpreter here"; status=1
        printf '{"cell": "%s", "status": "missing", "reason": "no second Python 3.11 outside /usr/bin"}\n' "$name" > "$result"
        continue
    fi
    if [[ "$py" == root:* ]]; then
        build_root_venv "$torch" "$CACHE/results/$name.build.log" || { say "$name: building failed"; status=1;
            printf '{"cell": "%s", "status": "build failed"}\n' "$name" > "$result"; continue; }
        run=(scripts/debian_root.sh run "$ROOT313" -- env OMP_NUM_THREADS=1 /opt/venv/bin/python)
    else
        venv=$CACHE/venv-$name
        build_host_venv "$venv" "$py" "$torch" "$CACHE/results/$name.build.log" || { say "$name: building failed"; status=1;
            printf '{"cell": "%s", "status": "build failed"}\n' "$name" > "$result"; continue; }
        run=("$venv/bin/python")
    fi
    build_s=$(( $(date +%s) - t0 ))
    versions=$("${run[@]}" -c "$VERSIONS" 2>/dev/null | tail -1)
    say "$name: $versions; running the compat tests"
    t1=$(date +%s)
    "${run[@]}" -m pytest -q -m compat -p no:cacheprovider --junitxml="$REPO/$CACHE/results/$name.xml" \
        ${COMPAT_PYTEST_ARGS:-} 2>&1 | tee "$CACHE/results/$name.log" | tail -5 >&2
    "${run[@]}" -m megatron_sayo.testing.pickle_samples tests/formats/pickle_samples 2>/dev/null >&2 \
        || { say "$name: pickle samples failed"; status=1; }
    python3 -m megatron_sayo.testing.compat_report cell "$name" "$what" "$versions" \
        "$CACHE/results/$name.xml" "$build_s" "$(( $(date +%s) - t1 ))" > "$result" || status=1
done

python3 -m megatron_sayo.testing.compat_report table "$CACHE/results" compat.json docs/compat.md || status=1
exit $status
