"""The torch thread count: cgroup quota parsing (v1 and v2, fake files), affinity, the reservation for
the sandbox, and who wins (--threads, then OMP_NUM_THREADS, then the automatic choice)."""
import pytest
import torch

from cir.threads import busy_elsewhere, cgroup_cpu_limit, choose_threads, configure_threads, usable_cpus


def fake_v2(tmp_path, cpu_max: dict[str, str], path: str = "/a/b"):
    root = tmp_path / "cg"
    (root / path.strip("/")).mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory\n")
    for where, value in cpu_max.items():
        (root / where.strip("/") / "cpu.max").write_text(value + "\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text(f"0::{path}\n")
    return root, proc


def fake_v1(tmp_path, quota: str, period: str, mount: str = "cpu,cpuacct", path: str = "/job"):
    root = tmp_path / "cg"
    d = root / mount / path.strip("/")
    d.mkdir(parents=True)
    (d / "cpu.cfs_quota_us").write_text(quota + "\n")
    (d / "cpu.cfs_period_us").write_text(period + "\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text(f"4:memory:/x\n3:cpu,cpuacct:{path}\n2:cpuset:/\n")
    return root, proc


def test_cgroup_v2_quota_tightest_of_the_cgroup_and_its_ancestors(tmp_path):
    root, proc = fake_v2(tmp_path, {"/a/b": "max 100000", "/a": "150000 100000"})
    assert cgroup_cpu_limit(root, proc) == pytest.approx(1.5)  # the parent's limit applies to the child
    root, proc = fake_v2(tmp_path / "2", {"/a/b": "50000 100000", "/a": "300000 100000"})
    assert cgroup_cpu_limit(root, proc) == pytest.approx(0.5)
    root, proc = fake_v2(tmp_path / "3", {"/a/b": "max 100000"})
    assert cgroup_cpu_limit(root, proc) is None


def test_cgroup_v1_quota_and_unlimited(tmp_path):
    root, proc = fake_v1(tmp_path, "300000", "100000")
    assert cgroup_cpu_limit(root, proc) == pytest.approx(3.0)
    root, proc = fake_v1(tmp_path / "2", "-1", "100000", mount="cpu")
    assert cgroup_cpu_limit(root, proc) is None


def test_no_cgroup_files_means_no_limit(tmp_path):
    assert cgroup_cpu_limit(tmp_path / "none", tmp_path / "missing") is None


def test_usable_cpus_and_choice():
    assert usable_cpus(affinity=8) == 8
    assert usable_cpus(affinity=8, quota=2.5) == 2  # a fractional quota rounds down
    assert usable_cpus(affinity=2, quota=0.5) == 1  # never below one
    assert usable_cpus(affinity=16, ranks_here=4) == 4  # torchrun: the ranks on one machine share it
    assert choose_threads(2, reserved=2) == 1 and choose_threads(2) == 2 and choose_threads(16, reserved=4) == 12
    assert choose_threads(8, reserved=2, busy=3) == 3 and choose_threads(2, busy=busy_elsewhere(2, load=6.3)) == 1
    assert busy_elsewhere(4, load=1.4) == 1 and busy_elsewhere(4, load=0.2) == 0 and busy_elsewhere(4, load=9) == 4


def test_configure_auto_override_and_env(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    lines = []
    try:
        root, proc = fake_v2(tmp_path, {"/a/b": "100000 100000"})  # one CPU's quota
        assert configure_threads(None, reserved=0, env={}, log=lines.append, cgroup_root=root,
                                 proc_cgroup=proc, load=0.0) == 1
        assert torch.get_num_threads() == 1 and "cgroup quota 1" in lines[-1]
        assert configure_threads(3, env={"OMP_NUM_THREADS": "1"}, log=lines.append) == 3  # --threads wins
        assert torch.get_num_threads() == 3 and "as requested" in lines[-1]
        torch.set_num_threads(2)
        assert configure_threads(None, env={"OMP_NUM_THREADS": "2"}, log=lines.append) == 2  # left alone
        assert "OMP_NUM_THREADS=2" in lines[-1]
        monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
        assert configure_threads(None, reserved=1, env={}, log=lines.append, cgroup_root=tmp_path / "no",
                                 proc_cgroup=tmp_path / "no", load=0.1) == 3
        assert "4 CPUs usable" in lines[-1] and "1 left to the sandbox" in lines[-1]
        assert configure_threads(None, reserved=1, env={}, log=lines.append, cgroup_root=tmp_path / "no",
                                 proc_cgroup=tmp_path / "no", load=1.8) == 1  # a busy machine: fewer threads
        assert "2 busy with other programs" in lines[-1]
        with pytest.raises(ValueError, match="threads must be >= 1"):
            configure_threads(0, log=lines.append)
    finally:
        torch.set_num_threads(before)
