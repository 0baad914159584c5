"""`visor_vllm.training.machine`: the CPU behind a run's minutes, from /proc/cpuinfo."""

from visor_vllm.training.machine import describe, label

ZEN1 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 fma

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 fma
"""


def test_the_family_and_model_numbers_tell_two_epycs_apart(tmp_path):
    zen1 = tmp_path / "zen1"
    zen1.write_text(ZEN1)
    zen4 = tmp_path / "zen4"
    zen4.write_text(ZEN1.replace(": 23", ": 25").replace("model\t\t: 1", "model\t\t: 17")
                    .replace("avx2 fma", "avx2 fma avx512f avx512bw"))
    a, b = describe(zen1), describe(zen4)
    assert (a["cpu"], a["cpu_family"], a["cpu_model"], a["isa"]) == ("AMD EPYC", 23, 1, "avx2")
    assert (b["cpu_family"], b["cpu_model"], b["isa"]) == (25, 17, "avx512")
    a["allocator"] = "glibc"
    assert label(a).startswith("AMD EPYC (x86 family 23 model 1), ") and label(a).endswith("AVX2")
    assert label({**a, "allocator": "tcmalloc"}).endswith("AVX2, tcmalloc")
    assert label(a) != label(b)
    assert a["cpus"] >= 1 and a["torch"] and a["threads"] >= 1


def test_a_machine_without_cpuinfo_is_still_described(tmp_path):
    d = describe(tmp_path / "missing")
    assert d["cpu_family"] is None and d["isa"] is None and d["cpus"] >= 1
    assert label(d)  # one line, whatever is known
    assert label(None) == "not recorded" and label({}) == "not recorded"
