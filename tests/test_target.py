"""fscnn_tvm.target: target resolution and host ISA detection."""
import json

import pytest
import tvm

from fscnn_tvm import target as T
from fscnn_tvm.target import host_target_dict, isa, resolve_target, vector_lanes, vector_registers

AVX512_CPUS = {"znver4", "znver5", "skylake-avx512", "icelake-server", "sapphirerapids", "cascadelake"}
AVX512_FLAGS = {"avx512f", "avx512bw", "avx512dq", "avx512vl"}
AVX2_FLAGS = {"sse4_2", "avx", "avx2", "fma"}


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(T.ENV_VAR, raising=False)


def test_none_is_host_llvm_with_num_cores(no_env):
    t = resolve_target(None)
    assert isinstance(t, tvm.target.Target)
    assert t.kind.name == "llvm"
    assert int(t.attrs["num-cores"]) == T.num_cores() >= 1
    expected = host_target_dict()
    if "mcpu" in expected:
        assert str(t.attrs["mcpu"]) == expected["mcpu"]


def test_none_reads_env_var(monkeypatch):
    monkeypatch.setenv(T.ENV_VAR, "llvm -mcpu=x86-64-v2 -num-cores 3")
    t = resolve_target(None)
    assert str(t.attrs["mcpu"]) == "x86-64-v2"
    assert int(t.attrs["num-cores"]) == 3


def test_dict_accepted_and_num_cores_added(no_env):
    t = resolve_target({"kind": "llvm", "mcpu": "znver3"})
    assert t.kind.name == "llvm"
    assert str(t.attrs["mcpu"]) == "znver3"
    assert int(t.attrs["num-cores"]) == T.num_cores()
    t = resolve_target({"kind": "llvm", "num-cores": 5})
    assert int(t.attrs["num-cores"]) == 5


def test_dict_not_mutated():
    spec = {"kind": "llvm"}
    resolve_target(spec)
    assert spec == {"kind": "llvm"}


@pytest.mark.parametrize("text", ["llvm -mcpu=znver3 -num-cores 2", "  llvm -mcpu znver3 -num-cores=2 ",
                                  json.dumps({"kind": "llvm", "mcpu": "znver3", "num-cores": 2})])
def test_string_forms(text):
    t = resolve_target(text)
    assert t.kind.name == "llvm"
    assert str(t.attrs["mcpu"]) == "znver3"
    assert int(t.attrs["num-cores"]) == 2


def test_string_mattr_list():
    t = resolve_target("llvm -mattr=+avx2,+fma -num-cores 1")
    assert [str(a) for a in t.attrs["mattr"]] == ["+avx2", "+fma"]


def test_target_object_passes_through():
    t = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    assert resolve_target(t) is t


@pytest.mark.parametrize("target,pattern", [
    ("cuda", r"cuda"),
    ({"kind": "cuda"}, r"cuda"),
    ("", r"empty string"),
    ("   ", r"empty string"),
    (3, r"got int"),
    (3.5, r"got float"),
    (["llvm"], r"got list"),
    ("llvm -mcpu=znver3 -no-such-option 7", r"TVM rejects"),
    ("llvm -mcpu=nosuchcpu", r"mcpu='nosuchcpu' is not a CPU that TVM's LLVM \d+ knows; list them with"),
    ("llvm -mcpu=znver33", r"did you mean znver3"),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "znver3"}, r"for mtriple='aarch64-linux-gnu'"),
])
def test_rejected(target, pattern):
    with pytest.raises(ValueError, match=pattern):
        resolve_target(target)


def test_cli_exits_nonzero_on_an_unknown_cpu(capsys):
    from fscnn_tvm.cli import main as cli
    assert cli(["layer", "--target", "llvm -mcpu=nosuchcpu", "--in-ch", "4", "--out-ch", "4", "--size", "6",
                "--budget", "0.01"]) == 2
    assert "mcpu='nosuchcpu'" in capsys.readouterr().err


def test_target_object_of_other_kind_rejected():
    with pytest.raises(ValueError, match=r"kind 'c' is not supported"):
        resolve_target(tvm.target.Target({"kind": "c"}))


def test_target_object_without_num_cores_rejected():
    with pytest.raises(ValueError, match=r"num-cores"):
        resolve_target(tvm.target.Target({"kind": "llvm"}))


# ----------------------------------------------------------------------------- ISA detection

@pytest.mark.parametrize("flags,expected", [
    (AVX512_FLAGS | AVX2_FLAGS, "avx512"),
    ((AVX512_FLAGS - {"avx512f"}) | AVX2_FLAGS, "avx2"),  # masked avx512f: no AVX-512
    ((AVX512_FLAGS - {"avx512vl"}) | AVX2_FLAGS, "avx2"),
    (AVX2_FLAGS, "avx2"),
    (AVX2_FLAGS - {"fma"}, "sse"),  # avx2 without fma is not the haswell feature set
    ({"sse4_2"}, "sse"),
    ({"sse4_1", "sse2"}, "generic"),
    (set(), "generic"),
    ({"avx512f", "avx512bw", "avx512dq", "avx512vl"}, "avx512"),
])
def test_isa(flags, expected):
    assert isa(set(flags)) == expected


@pytest.mark.parametrize("vendor", ["AuthenticAMD", "GenuineIntel"])
@pytest.mark.parametrize("flags", [
    (AVX512_FLAGS - {"avx512f"}) | AVX2_FLAGS,
    AVX2_FLAGS,
    {"sse4_2"},
    set(),
])
def test_host_target_never_avx512_without_avx512f(monkeypatch, vendor, flags):
    monkeypatch.setattr(T.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(T, "cpu_info", lambda: {"vendor": vendor, "model": "test", "flags": set(flags)})
    spec = host_target_dict()
    assert spec["kind"] == "llvm" and spec["num-cores"] >= 1
    assert spec.get("mcpu") not in AVX512_CPUS
    t = resolve_target(spec)
    assert vector_lanes(t) <= 8


@pytest.mark.parametrize("vendor,flags,mcpu,lanes", [
    ("AuthenticAMD", AVX512_FLAGS | AVX2_FLAGS, "znver4", 16),
    ("GenuineIntel", AVX512_FLAGS | AVX2_FLAGS, "skylake-avx512", 16),
    ("AuthenticAMD", AVX2_FLAGS, "znver3", 8),
    ("GenuineIntel", AVX2_FLAGS, "haswell", 8),
    ("GenuineIntel", {"sse4_2"}, "x86-64-v2", 4),
])
def test_host_target_mcpu_by_isa(monkeypatch, vendor, flags, mcpu, lanes):
    monkeypatch.setattr(T.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(T, "cpu_info", lambda: {"vendor": vendor, "model": "test", "flags": set(flags)})
    spec = host_target_dict()
    assert spec["mcpu"] == mcpu
    assert vector_lanes(resolve_target(spec)) == lanes


def test_host_target_generic_x86_has_no_mcpu(monkeypatch):
    monkeypatch.setattr(T.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(T, "cpu_info", lambda: {"vendor": "GenuineIntel", "model": "test", "flags": set()})
    assert "mcpu" not in host_target_dict()


def test_host_target_aarch64(monkeypatch):
    monkeypatch.setattr(T.platform, "machine", lambda: "aarch64")
    spec = host_target_dict()
    assert spec["mtriple"] == "aarch64-linux-gnu" and "mcpu" not in spec


@pytest.mark.skipif(T.platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 only")
def test_real_host_consistent_with_cpuinfo():
    """On this machine: an AVX-512 CPU exactly when the OS reports the AVX-512 flags."""
    flags = T.cpu_info()["flags"]
    mcpu = host_target_dict().get("mcpu")
    assert (mcpu in AVX512_CPUS) == (AVX512_FLAGS <= flags)


def test_cpu_info_parses_flags(monkeypatch, tmp_path):
    text = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC Test\n"
            "flags\t\t: fpu sse4_2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx512f\n")
    real_open = open

    def fake_open(path, *args, **kwargs):
        if path == "/proc/cpuinfo":
            p = tmp_path / "cpuinfo"
            p.write_text(text)
            return real_open(p, *args, **kwargs)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    info = T.cpu_info()
    assert info["vendor"] == "AuthenticAMD"
    assert info["model"] == "AMD EPYC Test"
    assert info["flags"] == {"fpu", "sse4_2", "avx2", "fma"}  # the first CPU only


@pytest.mark.parametrize("mcpu,lanes", [("znver4", 16), ("skylake-avx512", 16), ("sapphirerapids", 16),
                                        ("znver3", 8), ("haswell", 8), ("alderlake", 8), ("sandybridge", 8),
                                        ("x86-64-v2", 4), (None, 4)])
def test_vector_lanes(mcpu, lanes):
    spec = {"kind": "llvm", "num-cores": 1}
    if mcpu:
        spec["mcpu"] = mcpu
    assert vector_lanes(tvm.target.Target(spec)) == lanes


@pytest.mark.parametrize("attrs,registers", [({"mcpu": "znver4"}, 32), ({"mcpu": "znver3"}, 16), ({}, 16),
                                             ({"mtriple": "aarch64-linux-gnu"}, 32)])
def test_vector_registers(attrs, registers):
    assert vector_registers(tvm.target.Target({"kind": "llvm", "num-cores": 1, **attrs})) == registers


def _fake_cache(root, index, level, kind, size, shared, line=64):
    d = root / f"index{index}"
    d.mkdir(parents=True)
    for name, value in (("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared),
                        ("coherency_line_size", line)):
        (d / name).write_text(f"{value}\n")


def test_sysfs_caches_per_core(tmp_path):
    _fake_cache(tmp_path, 0, 1, "Data", "48K", "0", line=128)
    _fake_cache(tmp_path, 1, 1, "Instruction", "32K", "0")
    _fake_cache(tmp_path, 2, 2, "Unified", "4096K", "0-1")  # one L2 shared by two CPUs: half each
    _fake_cache(tmp_path, 3, 3, "Unified", "105M", "0-55")
    assert T.sysfs_caches(str(tmp_path)) == (48 << 10, 2 << 20, 128)


def test_sysfs_caches_fall_back_where_sysfs_says_nothing(tmp_path):
    _fake_cache(tmp_path, 0, 1, "Data", "garbage", "0")
    assert T.sysfs_caches(str(tmp_path)) == T.CROSS_CACHES
    assert T.sysfs_caches(str(tmp_path / "missing")) == T.CROSS_CACHES


def test_caches_of_another_cpu_are_the_cross_defaults(monkeypatch):
    monkeypatch.delenv(T.CACHES_ENV, raising=False)
    host = resolve_target(None)
    assert T.caches(host).cores == int(host.attrs["num-cores"])
    other = "znver4" if host.attrs.get("mcpu") != "znver4" else "haswell"
    cross = T.caches(resolve_target(f"llvm -mcpu={other}"))
    assert (cross.l1d, cross.l2, cross.line) == T.CROSS_CACHES
    # described: for the other CPU only, the host keeps what its OS says
    monkeypatch.setenv(T.CACHES_ENV, "48K, 2M, 64")
    cross = T.caches(resolve_target(f"llvm -mcpu={other} -num-cores=4"))
    assert (cross.l1d, cross.l2, cross.line, cross.cores) == (48 << 10, 2 << 20, 64, 4)
    assert (T.caches(host).l1d, T.caches(host).l2) == T.sysfs_caches()[:2]


@pytest.mark.parametrize("text", ["32K,1M", "32K,1M,64,8", "a,b,c", "32K,0,64", "-1,1M,64", "32K,,64"])
def test_a_cache_description_that_does_not_parse_is_a_clear_error(monkeypatch, text):
    monkeypatch.setenv(T.CACHES_ENV, text)
    with pytest.raises(ValueError, match="FSCNN_TVM_CACHES"):
        T.caches(resolve_target("llvm -mcpu=haswell" if resolve_target(None).attrs.get("mcpu") != "haswell"
                                else "llvm -mcpu=znver4"))
