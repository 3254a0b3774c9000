#!/usr/bin/env bash
# Compile-check every csrc/**/*.cpp against the torch headers with the compilers and targets the
# extension must build with (`make cpp-check`; CI runs it): GCC >= 11 and clang >= 14, x86-64 and
# ARM64. setup.py builds with the machine's g++ and -march=native only, so without this a GCC-12-only
# builtin or an intrinsic outside its target would first fail on someone else's machine.
#   usage: csrc/tools/cpp_check.sh [PYTHON]        (default: .venv/bin/python, for the torch headers)
#
# Targets (name  compiler  flags  mode):
#   gcc12-native   g++-12                  -march=native      syntax  (what setup.py builds here)
#   gcc11-v4       g++-11                  -march=x86-64-v4   object  (AVX-512 intrinsics: codegen)
#   gcc11-v3       g++-11                  -march=x86-64-v3   syntax
#   clang-v4       clang++ (>= 14)         -march=x86-64-v4   object
#   clang-v3       clang++ (>= 14)         -march=x86-64-v3   syntax
#   gcc-arm64      aarch64-linux-gnu-g++   -march=armv8-a     syntax  (cross compiler, NEON)
# "syntax" is -fsyntax-only: parsing and template instantiation, enough for the builtins of the
# vector extensions; "object" is -c -O0: an intrinsic used outside its target ISA only fails when
# code is generated (-O0: the checks are the same, the optimiser's time is not spent). Objects are
# thrown away. Compiles run one after the other (CI has 2 cores), one translation unit per target.
#
# Missing compilers are installed with apt-get (Debian/Ubuntu package names: g++-11, g++-12, clang,
# libomp-dev for clang's omp.h, g++-aarch64-linux-gnu). Where apt-get is not usable (no apt-get, or
# neither root nor passwordless sudo) the targets whose compiler is missing are SKIPPED with the
# reason printed; a failed install or a failed compile fails the check.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-.venv/bin/python}

mapfile -t files < <(find csrc -name '*.cpp' | sort)
mapfile -t torch_incs < <("$PY" -c "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")
py_inc=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
# the defines and flags of setup.py's CppExtension (torch adds the first three)
common=(-std=c++20 -fopenmp -ffp-contract=fast -DPy_LIMITED_API=0x030a0000 -DTORCH_EXTENSION_NAME=_C
        -DTORCH_API_INCLUDE_EXTENSION_H -Icsrc "${torch_incs[@]/#/-I}" -I"$py_inc")

# clang++ of version >= 14: plain clang++ or the newest versioned one
find_clang() {
  local c v
  for c in clang++ clang++-{20,19,18,17,16,15,14}; do
    command -v "$c" >/dev/null || continue
    v=$("$c" -dumpversion 2>/dev/null | cut -d. -f1)
    if [ "${v:-0}" -ge 14 ]; then echo "$c"; return; fi
  done
}
# the OpenMP header clang needs (libomp's omp.h: clang does not search GCC's private include dir)
clang_has_omp() { echo '#include <omp.h>' | "$1" -fopenmp -x c++ -fsyntax-only - 2>/dev/null; }

apt_unusable_reason() {
  command -v apt-get >/dev/null || { echo "apt-get not found"; return; }
  if [ "$(id -u)" -ne 0 ] && ! sudo -n true 2>/dev/null; then echo "not root and no passwordless sudo"; fi
}
apt_updated=0
apt_install() {  # packages...
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo -n)
  if [ $apt_updated -eq 0 ]; then
    echo "cpp-check: apt-get update"
    "${sudo[@]}" apt-get update -qq
    apt_updated=1
  fi
  echo "cpp-check: apt-get install $*"
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Install what is missing, once, where apt-get is usable.
need=()
command -v g++-12 >/dev/null || need+=(g++-12)
command -v g++-11 >/dev/null || need+=(g++-11)
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
clang=$(find_clang)
if [ -z "$clang" ]; then need+=(clang libomp-dev)
elif ! clang_has_omp "$clang"; then need+=("libomp-$("$clang" -dumpversion | cut -d. -f1)-dev"); fi
if [ ${#need[@]} -gt 0 ]; then
  reason=$(apt_unusable_reason)
  if [ -n "$reason" ]; then
    echo "cpp-check: cannot install ${need[*]}: $reason; the targets that need them are skipped"
  else
    apt_install "${need[@]}"
    clang=$(find_clang)
    if [ -z "$clang" ]; then
      echo "cpp-check: FAIL apt-get installed 'clang' but no clang++ >= 14 is on PATH"; exit 1
    fi
  fi
fi

targets=(
  "gcc12-native|g++-12|-march=native|syntax"
  "gcc11-v4|g++-11|-march=x86-64-v4|object"
  "gcc11-v3|g++-11|-march=x86-64-v3|syntax"
  "clang-v4|${clang:-clang++}|-march=x86-64-v4|object"
  "clang-v3|${clang:-clang++}|-march=x86-64-v3|syntax"
  "gcc-arm64|aarch64-linux-gnu-g++|-march=armv8-a|syntax"
)
out=build/cpp-check
mkdir -p "$out"
# One translation unit including every .cpp: the torch headers (most of the time: 5 s per file) are
# parsed once per target, not once per file. Each file on its own is compiled by the real build
# (setup.py); a unity failure is re-run file by file so the report names the file, and the per-file
# results decide.
unity="$out/all_sources.cpp"
printf '#include "%s"\n' "${files[@]/#/$PWD/}" > "$unity"
status=0 skipped=0 total_start=$SECONDS
for t in "${targets[@]}"; do
  IFS='|' read -r name cxx arch mode <<<"$t"
  if ! command -v "$cxx" >/dev/null; then
    echo "cpp-check: SKIP $name ($cxx not installed)"; skipped=$((skipped + 1)); continue
  fi
  if [ "$mode" = object ]; then flags=(-c -O0); else flags=(-fsyntax-only); fi
  start=$SECONDS
  if "$cxx" "${common[@]}" "$arch" "${flags[@]}" "$unity" -o "$out/$name.o"; then
    echo "cpp-check: OK   $name ($cxx $arch $mode, ${#files[@]} files, $((SECONDS - start)) s)"
    continue
  fi
  echo "cpp-check: $name failed on all sources at once; compiling file by file"
  for f in "${files[@]}"; do
    if "$cxx" "${common[@]}" "$arch" "${flags[@]}" "$f" -o "$out/$name.o"; then
      echo "cpp-check: ok   $name $f"
    else
      echo "cpp-check: FAIL $name ($cxx $arch $mode) $f"; status=1
    fi
  done
  if [ $status -eq 0 ]; then
    echo "cpp-check: FAIL $name: every file compiles alone but not together (a name or macro clash?)"
    status=1
  fi
done
rm -f "$out"/*.o
echo "cpp-check: $([ $status -eq 0 ] && echo passed || echo FAILED), ${#targets[@]} targets ($skipped skipped)" \
     "x ${#files[@]} files in $((SECONDS - total_start)) s"
exit $status
