"""The build facts guard (issue #14): _C is refused, before it is imported, when it was built for an
ISA this CPU lacks or against another torch; setup.py records those facts and fails early when a
CUDA torch meets a missing CUDA toolkit.

Oracles: the x86-64 psABI micro-architecture levels (what -march=x86-64-v3 must enable) and a
real Zen 3 /proc/cpuinfo flags line (AVX2 + FMA, no AVX-512), not the code under test.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from concept_kernels import _ext, _isa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_EXT = os.environ.get("CONCEPT_KERNELS_NO_EXT", "") not in ("", "0")
skip_if_no_ext = pytest.mark.skipif(NO_EXT, reason="CONCEPT_KERNELS_NO_EXT=1: pure-Python install")

# an AMD EPYC 7763 (Zen 3): AVX2, FMA, VAES, no AVX-512
ZEN3_FLAGS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht "
    "syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid "
    "aperfmperf rapl pni pclmulqdq monitor ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave "
    "avx f16c rdrand lahf_lm cmp_legacy svm extapic cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw ibs "
    "skinit wdt tce topoext perfctr_core perfctr_nb bpext perfctr_llc mwaitx cpb cat_l3 cdp_l3 hw_pstate "
    "ssbd mba ibrs ibpb stibp vmmcall fsgsbase bmi1 avx2 smep bmi2 erms invpcid cqm rdt_a rdseed adx smap "
    "clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 xsaves cqm_llc cqm_occup_llc cqm_mbm_total "
    "cqm_mbm_local clzero irperf xsaveerptr rdpru wbnoinvd arat npt lbrv svm_lock nrip_save tsc_scale "
    "vmcb_clean flushbyasid decodeassists pausefilter pfthreshold v_vmsave_vmload vgif v_spec_ctrl umip "
    "pku ospke vaes vpclmulqdq rdpid overflow_recov succor smca fsrm"
)
# x86-64 psABI levels, as ISA macros of the table (v2: SSE3..SSE4_2, POPCNT, LAHF/SAHF; v3 adds AVX,
# AVX2, BMI1/2, F16C, FMA, LZCNT, MOVBE)
V2 = {"__SSE3__", "__SSSE3__", "__SSE4_1__", "__SSE4_2__", "__POPCNT__", "__LAHF_SAHF__"}
V3 = V2 | {"__AVX__", "__AVX2__", "__BMI__", "__BMI2__", "__F16C__", "__FMA__", "__LZCNT__", "__MOVBE__"}
AVX512 = ["__AVX512F__", "__AVX512CD__", "__AVX512DQ__", "__AVX512BW__", "__AVX512VL__"]


def _facts(**over):
    base = {"ext_requested": True, "with_cuda": False, "torch": torch.__version__, "cpu_arch": "native",
            "isa": sorted(V3)}
    return {**base, **over}


@pytest.fixture
def fresh_ext():
    _ext._reset_for_tests()
    yield _ext
    _ext._reset_for_tests()


@pytest.fixture
def zen3_cpu(tmp_path, monkeypatch):
    """This process reads a Zen 3's /proc/cpuinfo."""
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: {ZEN3_FLAGS}\n\n"
                    f"processor\t: 1\nflags\t\t: {ZEN3_FLAGS}\n")
    monkeypatch.setattr(_isa, "CPUINFO", str(path))
    return path


@pytest.fixture
def loader(fresh_ext, monkeypatch):
    """Run the loader with faked build facts; record whether it went on to import _C."""
    imported = []
    monkeypatch.delenv("CONCEPT_KERNELS_NO_EXT", raising=False)
    monkeypatch.setattr(fresh_ext, "_ext_present", lambda: True)
    monkeypatch.setattr(fresh_ext, "_import_ext", lambda: imported.append(True))

    def run(facts):
        monkeypatch.setattr(fresh_ext, "build_info", lambda: dict(facts))
        return fresh_ext.HAS_EXT, fresh_ext.EXT_ERROR, bool(imported)

    return run


def test_compiler_isa_follows_the_psabi_levels():
    """The compiler probe setup.py records: -march=x86-64 enables nothing beyond SSE2, -v2 and -v3
    exactly their psABI sets (of the table), -v4 adds AVX-512 F/CD/DQ/BW/VL."""
    assert _isa.compiler_isa("c++", ["-march=x86-64"]) == []
    assert set(_isa.compiler_isa("c++", ["-march=x86-64-v2"])) == V2
    assert set(_isa.compiler_isa("c++", ["-O3", "-march=x86-64-v3"])) == V3
    assert set(_isa.compiler_isa("c++", ["-march=x86-64-v4"])) == V3 | set(AVX512)
    with pytest.raises(RuntimeError, match="march"):
        _isa.compiler_isa("c++", ["-march=no-such-cpu"])


def test_cpu_flags_reads_the_first_flags_line(zen3_cpu, monkeypatch):
    flags = _isa.cpu_flags()
    assert {"avx2", "fma", "vaes"} <= flags and "avx512f" not in flags
    monkeypatch.setattr(_isa, "CPUINFO", str(zen3_cpu) + ".absent")
    assert _isa.cpu_flags() is None


@pytest.mark.parametrize("isa,missing", [
    (sorted(V3), []),                                   # a portable x86-64-v3 wheel runs on Zen 3
    (sorted(V3) + AVX512, AVX512),                      # a -march=x86-64-v4 / native AVX-512 build
    (sorted(V3) + ["__AVX512VNNI__", "__SSE4A__"], ["__AVX512VNNI__"]),
])
def test_isa_check_names_what_the_cpu_lacks(zen3_cpu, isa, missing):
    check = _ext.isa_check(_facts(isa=isa))
    assert sorted(check["missing"]) == sorted(missing)
    assert set(check["cpu_isa"]) >= V3 and "__AVX512F__" not in check["cpu_isa"]
    assert check["verdict"].startswith("refused" if missing else "ok")


def test_guard_refuses_an_avx512_build_on_zen3_without_importing_it(loader, zen3_cpu):
    has, err, imported = loader(_facts(isa=sorted(V3) + AVX512))
    assert has is False and not imported  # refused BEFORE import: its static initialisers may use AVX-512
    assert "AVX512F AVX512CD AVX512DQ AVX512BW AVX512VL" in err and "SIGILL" in err
    assert "pip install --no-build-isolation --no-deps -e ." in err
    assert "CONCEPT_KERNELS_CPU_ARCH=x86-64-v3" in err
    with pytest.raises(RuntimeError, match="ot_similarity.*AVX512F"):
        _ext.require_ext("ot_similarity (cpu kernel)")


def test_guard_passes_a_v3_build_on_zen3(loader, zen3_cpu):
    has, err, imported = loader(_facts(isa=sorted(V3), cpu_arch="x86-64-v3"))
    assert has is True and err is None and imported


def test_guard_does_not_refuse_where_cpu_flags_are_unreadable(loader, zen3_cpu, monkeypatch):
    monkeypatch.setattr(_isa, "CPUINFO", str(zen3_cpu) + ".absent")  # e.g. macOS: no /proc/cpuinfo
    has, err, imported = loader(_facts(isa=sorted(V3) + AVX512))
    assert has is True and imported
    assert _ext.isa_check(_facts(isa=AVX512))["verdict"].startswith("unknown")


@pytest.mark.parametrize("built", ["2.12.0+cpu", torch.__version__.split("+")[0] + "+cu130", "2.99.0"])
def test_guard_refuses_a_build_for_another_torch(loader, built):
    has, err, imported = loader(_facts(torch=built))
    assert has is False and not imported
    assert f"built against torch {built}, but torch {torch.__version__} is running" in err
    assert "pip install --no-build-isolation --no-deps -e ." in err


def test_guard_refuses_a_build_without_facts(loader):
    has, err, imported = loader({"ext_requested": False, "with_cuda": False})  # a NO_EXT build's facts
    assert has is False and not imported and "_build_info.py does not describe it" in err


@skip_if_no_ext
def test_the_real_build_passes_the_guard_here():
    facts = _ext.build_info()
    assert facts.get("isa") is not None and facts.get("torch") == torch.__version__
    check = _ext.isa_check()
    assert check["missing"] == [] and check["verdict"].startswith("ok"), check
    assert _ext.HAS_EXT, _ext.EXT_ERROR


@skip_if_no_ext
def test_recorded_isa_is_what_the_library_was_compiled_with():
    """setup.py's compiler probe agrees with the macros the compiled registration.cpp saw."""
    assert _ext.HAS_EXT, _ext.EXT_ERROR
    compiled = torch.ops.concept_kernels.build_isa().split()
    assert compiled == _ext.build_info()["isa"]
    assert set(compiled) <= set(_isa.ISA_FLAGS)


@skip_if_no_ext
def test_refused_build_leaves_a_working_package(zen3_cpu):
    """In a fresh interpreter on a (faked) Zen 3 with this build's facts made AVX-512: the package
    imports, _C is never loaded, the ops run on their reference backends, and info says why."""
    code = rf"""
import sys, torch
import concept_kernels as ck
from concept_kernels import _ext, _isa, info
from concept_kernels.testing import ot_problem
_isa.CPUINFO = {str(zen3_cpu)!r}
facts = dict(_ext.build_info(), isa={sorted(V3) + AVX512!r}, torch=torch.__version__)
_ext.build_info = lambda: facts
q, b, i = ot_problem(2, 3, 4, dim=8, seed=0)
out = ck.ot_similarity(q, b, i, select="topk", k=2)
ref = ck.ot_similarity(q, b, i, select="topk", k=2, backend="reference")
assert torch.equal(out, ref)
assert "concept_kernels._C" not in sys.modules, "the refused _C was imported"
text = info.report()
assert "ISA: verdict: refused: this CPU lacks AVX512F" in text, text
assert "this CPU lacks" in _ext.EXT_ERROR and "x86-64-v3" in _ext.EXT_ERROR
print("OK")
"""
    env = dict(os.environ, CONCEPT_KERNELS_NO_EXT="", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr


# ----- setup.py (imported as a module: its setup() call runs only as __main__)

@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("ck_setup_under_test", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cuda_toolkit_problems_are_named(setup_py, tmp_path):
    assert "no CUDA toolkit found" in setup_py._cuda_toolkit_problem(None)
    assert "has no bin/nvcc" in setup_py._cuda_toolkit_problem(str(tmp_path))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "nvcc").chmod(0o755)
    (tmp_path / "lib64").mkdir()
    (tmp_path / "lib64" / "libcudart.so.12").write_text("")  # runtime only: no link-time libcudart.so
    assert "cannot find -lcudart" in setup_py._cuda_toolkit_problem(str(tmp_path))
    (tmp_path / "lib64" / "libcudart.so").write_text("")
    assert setup_py._cuda_toolkit_problem(str(tmp_path)) is None


def test_cuda_torch_without_toolkit(setup_py, tmp_path, monkeypatch, capsys):
    """The running torch has CUDA but no toolkit is installed: C++ ops only, the reason recorded (pip hides
    the printed line); a torch from pip's isolated build environment: the build fails early."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    monkeypatch.delenv("CONCEPT_KERNELS_NO_EXT", raising=False)
    monkeypatch.delenv("CONCEPT_KERNELS_NO_CUDA", raising=False)
    (ext,), _, facts = setup_py.extensions()
    assert not any(s.endswith(".cu") for s in ext.sources) and facts["with_cuda"] is False
    assert "no CUDA toolkit found" in facts["cuda_skipped"]
    assert "has CUDA 12.8" in capsys.readouterr().err
    monkeypatch.setattr(setup_py, "_isolated", lambda t: True)
    with pytest.raises(SystemExit) as e:
        setup_py.extensions()
    assert "has CUDA 12.8" in str(e.value) and "CONCEPT_KERNELS_NO_CUDA=1" in str(e.value)
    assert "isolated build environment" in str(e.value)
    monkeypatch.undo()
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    monkeypatch.setenv("CONCEPT_KERNELS_NO_CUDA", "1")  # the documented way to build the C++ ops only
    monkeypatch.setenv("CONCEPT_KERNELS_CPU_ARCH", "x86-64-v3")
    (ext,), _, facts = setup_py.extensions()
    assert not any(s.endswith(".cu") for s in ext.sources)
    assert facts["with_cuda"] is False and facts["torch"] == torch.__version__
    assert facts["cpu_arch"] == "x86-64-v3" and set(facts["isa"]) == V3
