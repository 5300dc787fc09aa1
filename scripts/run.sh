#!/usr/bin/env bash
# The main job: the whole recipe on the embedded world, `tiny` preset, into runs/tiny (resumable:
# run it again to continue). Extra arguments go to `alignloop run`.
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
exec alignloop run --preset tiny --out runs/tiny "$@"
