#!/usr/bin/env bash
# Build the extension with AddressSanitizer + UndefinedBehaviorSanitizer and run the parity and
# reliability tests against it. Nothing in the repository or its own environment changes: the
# working tree is copied, built and installed into a separate venv, and the tests run there.
#
#   tools/sanitize.sh                      # the default test files (below)
#   tools/sanitize.sh tests/test_cpp.py -x # other test files / pytest arguments, repo-relative
#
# Environment: SANITIZE_VENV (default /tmp/myrnn-asan-venv; created on first use with torch
# 2.13.0 and the test dependencies), SANITIZE_WORK (default: a fresh temporary directory; holds
# the copy and the build). Needs gcc/g++ with libasan and libubsan, and CMake >= 3.25.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${SANITIZE_VENV:-/tmp/myrnn-asan-venv}
work=${SANITIZE_WORK:-$(mktemp -d /tmp/myrnn-asan.XXXXXX)}
src=$work/src
flags="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -g"

if [[ ! -x $venv/bin/python ]]; then
  echo "== creating $venv"
  # A plain venv: one with --system-site-packages could see another editable install.
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.13.0 numpy numba scipy pytest hypothesis scikit-build-core pybind11 ninja
fi

echo "== copying the working tree (tracked and untracked, not ignored) to $src"
rm -rf "$src" && mkdir -p "$src"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} sh -c 'test -e "{}" && echo "{}"') \
  | (cd "$repo" && tar -cf - -T -) | tar -xf - -C "$src"

echo "== building with: $flags"
"$venv/bin/pip" install -q --no-build-isolation --no-deps --force-reinstall "$src" \
  -Cbuild-dir="$work/build" -Ccmake.build-type=RelWithDebInfo \
  -Ccmake.define.CMAKE_CXX_FLAGS="$flags" \
  -Ccmake.define.CMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
  -Ccmake.define.CMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined"

# The interpreter is not instrumented, so the ASan runtime is preloaded, and libstdc++ with it:
# without it ASan cannot find the real __cxa_throw and aborts on the first C++ exception torch
# throws. CPython and torch keep allocations alive until exit by design: leak detection off. Any
# sanitizer report stops the run with a non-zero status.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_odr_violation=0:print_summary=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

cd "$work"  # not the repository: `import myrnn_fast` must find the sanitized install
ext=$("$venv/bin/python" -c 'import myrnn_fast._C as c; print(c.__file__)')
case $ext in
  "$venv"/*) ;;
  *) echo "error: myrnn_fast._C comes from $ext, not from $venv" >&2; exit 1 ;;
esac
# Instrumented code calls the runtimes' report hooks: count them, so a build that silently
# dropped the flags fails here rather than passing clean.
asan_hooks=$(nm -D "$ext" | grep -c ' U __asan_report_' || true)
ubsan_hooks=$(nm -D "$ext" | grep -c ' U __ubsan_handle_' || true)
if [[ $asan_hooks -eq 0 || $ubsan_hooks -eq 0 ]]; then
  echo "error: $ext is not instrumented (ASan hooks: $asan_hooks, UBSan hooks: $ubsan_hooks)" >&2; exit 1
fi
echo "== extension: $ext ($asan_hooks ASan and $ubsan_hooks UBSan hook kinds referenced)"

if [[ $# -eq 0 ]]; then
  set -- tests/test_parity.py tests/test_gradcheck.py tests/test_cell.py tests/test_errors.py \
    tests/test_odd_inputs.py tests/test_entry_validation.py tests/test_fuzz.py tests/test_threads.py
  [[ -e $src/tests/test_cpp.py ]] && set -- "$@" tests/test_cpp.py
fi
args=()
for a in "$@"; do
  if [[ $a == tests/* ]]; then args+=("$src/$a"); else args+=("$a"); fi
done

echo "== pytest ${args[*]}"
"$venv/bin/python" -m pytest -q -p no:cacheprovider "${args[@]}"
