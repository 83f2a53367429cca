# Sourced by the benchmark shell scripts (`source "$(dirname "$0")/script_setup.sh"`, before reading "$@"):
# - splits the arguments at `--`: the script's own stay in "$@"; those after it go to ${extra[@]}, which the
#   script passes to every `kvedit bench` call (e.g. `-- --ray --workers 2`);
# - here: the project folder; shared: ../shared/data beside it; kvedit: $KVEDIT, else the project's .venv one,
#   else the one on PATH; python: the interpreter beside that kvedit;
# - step CMD…: runs CMD and appends its wall time and arguments to $out/timing.log (set `out` first).
positional=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do positional+=("$1"); shift; done
[ $# -gt 0 ] && shift
extra=("$@")
set -- ${positional[@]+"${positional[@]}"}
here="$(cd "$(dirname "$0")/.." && pwd)"
shared="$(cd "$here/.." && pwd)/shared/data"
kvedit="${KVEDIT:-$here/.venv/bin/kvedit}"
[ -x "$kvedit" ] || kvedit=kvedit
python="$(dirname "$(command -v "$kvedit")")/python"  # the interpreter kvedit runs in, for inline checks
[ -x "$python" ] || python=python
step() { local start=$SECONDS; "$@"; echo "$(date -u +%FT%TZ) $((SECONDS - start)) s: ${*:2}" >> "$out/timing.log"; }
