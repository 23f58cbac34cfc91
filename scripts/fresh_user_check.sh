#!/usr/bin/env bash
# What a user who clones lowmem-cnn gets from the README's two test commands,
#     pip install '.[test]'
#     python -m pytest -q
# on a machine with nothing beside the project: no ../shared, an empty HOME and user
# cache, a fresh venv, LOWMEM_CNN_DATA and CI unset. MNIST then comes the way it comes
# for that user, by the tests' one verified download into the user cache; here from a
# local mirror (python -m http.server on 127.0.0.1) serving the four .gz files, through
# LOWMEM_CNN_MIRRORS, so the check needs no network but the package registries.
#
# Fails if pytest fails or skips anything: on Linux, after `pip install '.[test]'`,
# every test has what it needs, so a skip means a fresh user misses something.
#
# Usage: scripts/fresh_user_check.sh [--working-tree] [--mnist DIR] [--keep]
#   default         the committed HEAD of this repository (git clone)
#   --working-tree  the working tree as it would be committed: tracked and untracked
#                   files that .gitignore does not exclude, without .git
#   --mnist DIR     the four MNIST files to serve, .gz or raw (default ../shared/data/mnist)
#   --keep          keep the scratch directory (it is printed) instead of removing it
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
from_working_tree=false
mnist_source="$repo/../shared/data/mnist"
keep=false
while [ $# -gt 0 ]; do
    case "$1" in
        --working-tree) from_working_tree=true ;;
        --mnist) mnist_source="$2"; shift ;;
        --keep) keep=true ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
python="${PYTHON:-python3}"

work="$(mktemp -d "${TMPDIR:-/tmp}/lowmem-fresh-user.XXXXXX")"
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    if $keep; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT  # so that Ctrl-C and kill run the EXIT trap too
trap 'exit 143' TERM

# The user's checkout sits alone in its parent: there is no ../shared to fall back on.
tree="$work/user/lowmem-cnn"
mkdir -p "$work/user" "$work/home" "$work/cache" "$work/mirror"
if $from_working_tree; then
    mkdir "$tree"
    # what `git add -A` would take: the copy also proves .gitignore keeps what the tests need
    git -C "$repo" ls-files -z --cached --others --exclude-standard \
        | (cd "$repo" && while IFS= read -r -d '' path; do
               if [ -e "$path" ] || [ -L "$path" ]; then printf '%s\0' "$path"; fi  # not deleted
           done) \
        | tar -C "$repo" --null -T - -cf - | tar -C "$tree" -xf -
    echo "source: working tree of $repo"
else
    git clone --quiet --no-hardlinks "$repo" "$tree"
    echo "source: HEAD $(git -C "$tree" rev-parse --short HEAD) of $repo"
fi
if [ -e "$tree/../shared" ]; then
    echo "$tree/../shared exists: not a fresh user's layout" >&2
    exit 1
fi

# The mirror: data.py fetches MIRROR/NAME.gz and verifies the decompressed content, so
# any gzip of the right bytes will do.
for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    if [ -f "$mnist_source/$name.gz" ]; then
        cp "$mnist_source/$name.gz" "$work/mirror/"
    elif [ -f "$mnist_source/$name" ]; then
        gzip -c "$mnist_source/$name" > "$work/mirror/$name.gz"
    else
        echo "$mnist_source has neither $name nor $name.gz (see --mnist)" >&2
        exit 1
    fi
done

# Port 0: the OS picks a free port, and the server prints it once it listens, so
# reading that line is the wait (stderr, its request log, goes to a file).
coproc SERVER { exec "$python" -u -m http.server --bind 127.0.0.1 --directory "$work/mirror" 0 \
                    2>"$work/server.log"; }
server_pid="$SERVER_PID"
if ! IFS= read -r -t 30 banner <&"${SERVER[0]}"; then
    echo "the local mirror did not start: $(cat "$work/server.log")" >&2
    exit 1
fi
port="$(sed -n 's/^Serving HTTP on [^ ]* port \([0-9]*\).*/\1/p' <<<"$banner")"
[ -n "$port" ] || { echo "unexpected banner from http.server: $banner" >&2; exit 1; }
echo "local MNIST mirror: http://127.0.0.1:$port/"

# The fresh user: nothing of this machine's user, nor of the project's CI, in the way.
unset LOWMEM_CNN_DATA CI PYTHONPATH VIRTUAL_ENV XDG_CONFIG_HOME XDG_DATA_HOME PYTEST_ADDOPTS
export HOME="$work/home" XDG_CACHE_HOME="$work/cache"
export LOWMEM_CNN_MIRRORS="http://127.0.0.1:$port/"
"$python" -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
cd "$tree"

started=$SECONDS
echo "\$ pip install '.[test]'"
pip install --quiet '.[test]'
installed=$SECONDS
echo "\$ python -m pytest -q -rs"
set +e  # pytest's status is judged below, after the counts
python -m pytest -q -rs 2>&1 | tee "$work/pytest.log"
status=${PIPESTATUS[0]}
set -e
finished=$SECONDS

summary="$(grep -E '^=* *[0-9]+ (passed|failed|errors?)\b' "$work/pytest.log" | tail -n 1 | sed 's/^=* *//; s/ *=*$//')"
skips="$(grep -c '^SKIPPED' "$work/pytest.log" || true)"
downloads="$(grep -c 'GET /[a-z0-9-]*\.gz HTTP/1.[01]" 200' "$work/server.log" || true)"
echo
echo "counts:   ${summary:-no pytest summary line}"
echo "time:     pip install $((installed - started)) s, pytest $((finished - installed)) s"
echo "MNIST:    $downloads file(s) downloaded from the local mirror into $XDG_CACHE_HOME/lowmem-cnn/mnist"
if [ "$status" -ne 0 ]; then
    echo "FAILED: pytest exited with $status"
    exit 1
fi
if [ "$skips" -ne 0 ]; then
    echo "FAILED: $skips skip line(s) (reasons above, under 'short test summary info')"
    exit 1
fi
echo "OK: a fresh user's run skipped nothing"
