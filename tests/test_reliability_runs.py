"""Issue 11, run folders: safe loading, run names and --overwrite, validation before anything is
created, one-line errors, locks, leftover temporary files, permissions, strict summary.json, NaN
metrics in a summary, and a resume that checks what it resumes. Test names carry the case ids of
shared/reliability/cases-2026-11-30.tsv."""
from __future__ import annotations

import errno
import json
import os
import resource
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clbench.engine import atomic
from clbench.cli import main
from clbench.engine.config import ConfigError
from clbench.engine.locks import FolderLocked, check_unlocked, run_lock
from helpers import write_category

NAME = "ünï-运行"  # the reference run's name: unicode is a plain folder name too
CHECKPOINT = "checkpoint.pt"
RUN_MARKER = ".clbench-run.json"  # the results layout (README): what --overwrite may delete
FINGERPRINT = "data_fingerprint.json"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_category(root, "alpha")
    write_category(root, "beta", gray=True, seed=1)
    return root


def run_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--method", "padim", "--tasks", "2", "--image-size", "32", "--weights", "none", "--device", "cpu",
            "--no-progress", "--data-root", str(data), "--output", str(out), *extra]


def cli(args: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of ``clbench ARGS`` (in-process), stderr checked to be one error line."""
    code = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("clbench: ")]


@pytest.fixture(scope="module")
def reference(data_root: Path, tmp_path_factory) -> Path:
    """A complete 2-task run (written under umask 022) that tests copy and damage."""
    out = tmp_path_factory.mktemp("reference")
    old = os.umask(0o022)
    try:
        assert main(run_args(data_root, out, "--name", NAME)) == 0
    finally:
        os.umask(old)
    return out / NAME


@pytest.fixture
def copy(reference: Path, tmp_path: Path):
    """``copy(name)``: a copy of the reference run in tmp_path/out (mtimes kept), its folder."""

    def make(name: str = NAME) -> Path:
        target = tmp_path / "out" / name
        shutil.copytree(reference, target, symlinks=True)
        return target

    return make


def resume(data_root: Path, folder: Path, capsys, *extra: str) -> tuple[int, str]:
    return cli(run_args(data_root, folder.parent, "--name", folder.name, "--resume", *extra), capsys)


# -- safe loading (S01, F06, F06b, SEC) --------------------------------------------------------------
def _evil(path: Path, flag: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {flag}",))

    torch.save({"step": 0, "method": Evil(), "strategy": {}}, path)


DAMAGE = {
    "F06-garbage": lambda p, flag: p.write_bytes(b",garbage\n" * 10),
    "F06b-truncated-zip": lambda p, flag: p.write_bytes(p.read_bytes()[:1000]),
    "F06-empty": lambda p, flag: p.write_bytes(b""),
    "S01-pickled-code": _evil,
    "S01-no-method": lambda p, flag: torch.save({"step": 0}, p),
    "S01-not-a-mapping": lambda p, flag: torch.save([1, 2], p),
    "S01-step-out-of-range": lambda p, flag: torch.save({"step": 7, "method": {}, "strategy": {}}, p),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_F06_S01_damaged_or_hostile_checkpoint_is_one_line(damage: str, data_root: Path, copy, tmp_path: Path,
                                                           capsys) -> None:
    folder = copy()
    flag = tmp_path / "code-ran"
    DAMAGE[damage](folder / CHECKPOINT, flag)
    summary = (folder / "summary.json").read_bytes()
    code, err = resume(data_root, folder, capsys)
    assert code == 2
    assert error_lines(err) == [error_lines(err)[0]] and str(folder / CHECKPOINT) in err and "--overwrite" in err
    assert not flag.exists()  # nothing in the file ran
    assert (folder / "summary.json").read_bytes() == summary


def test_SEC_every_torch_load_is_weights_only() -> None:
    """No torch.load in the engine, methods or strategies may unpickle code."""
    repo = Path(__file__).resolve().parent.parent
    for folder in ("clbench", "methods", "strategies"):
        for path in (repo / folder).rglob("*.py"):
            text = path.read_text()
            start = 0
            while (at := text.find("torch.load(", start)) >= 0:
                depth, end = 0, at + len("torch.load")
                for end in range(end, len(text)):  # the call, up to its matching parenthesis
                    depth += {"(": 1, ")": -1}.get(text[end], 0)
                    if depth == 0:
                        break
                call = text[at: end + 1]
                assert "weights_only=True" in call, f"{path}: {call}"
                start = at + 1


# -- run names and --overwrite (S03, S04, S05) --------------------------------------------------------
@pytest.mark.parametrize("name", [".", "..", "a/b", "../x", "", "-rf", ".hidden", "a\nb", "x\x01"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_S03_S04_S05_run_name_is_one_plain_folder_name(name: str, overwrite: bool, data_root: Path, tmp_path: Path,
                                                        capsys) -> None:
    out = tmp_path / "outer" / "results"
    (out / "keep").mkdir(parents=True)
    (tmp_path / "outer" / "precious.txt").write_text("mine")
    args = run_args(data_root, out, f"--name={name}") + (["--overwrite"] if overwrite else [])
    code, err = cli(args, capsys)
    assert code == 2 and "name" in err
    assert (out / "keep").is_dir() and (tmp_path / "outer" / "precious.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "outer").iterdir()) == ["precious.txt", "results"]


def test_S04_name_in_a_config_file_is_checked_too(data_root: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("name: ..\n")
    code, err = cli(run_args(data_root, tmp_path / "out", "--config", str(config), "--overwrite"), capsys)
    assert code == 2 and "name='..' is not a plain folder name: must not start with '.'" in err


def test_default_run_name_keeps_a_slash_out_of_the_path() -> None:
    from clbench.engine.runner import default_run_name

    assert default_run_name("padim", "sequential", "hf-hub:timm/resnet18", 0) == "padim-sequential-hf-hub:timm_resnet18-seed0"


@pytest.mark.slow
def test_S05_overwrite_deletes_only_a_marked_run_folder(data_root: Path, copy, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    user = out / "mine"  # a folder with a config.yaml that clbench did not make
    user.mkdir(parents=True)
    (user / "config.yaml").write_text("method: padim\n")
    (user / "thesis.tex").write_text("x")
    code, err = cli(run_args(data_root, out, "--name", "mine", "--overwrite"), capsys)
    assert code == 2 and RUN_MARKER in err and (user / "thesis.tex").is_file()

    outside = tmp_path / "elsewhere"  # a run folder that is a link to somewhere else
    shutil.copytree(copy(), outside)
    (outside / "thesis.tex").write_text("x")
    (out / "link").symlink_to(outside)
    code, err = cli(run_args(data_root, out, "--name", "link", "--overwrite"), capsys)
    assert code == 2 and "symbolic link" in err and (outside / "thesis.tex").is_file()

    folder = out / NAME  # a real run: --overwrite starts it again, inside the output folder only
    (folder / "stray.txt").write_text("x")
    code, err = cli(run_args(data_root, out, "--name", NAME, "--overwrite"), capsys)
    assert code == 0 and not (folder / "stray.txt").exists() and (folder / "summary.json").is_file()


def test_new_run_never_writes_into_a_folder_it_did_not_make(data_root: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "out" / "photos"
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text("mine")
    code, err = cli(run_args(data_root, tmp_path / "out", "--name", "photos"), capsys)
    assert code == 2 and "not a clbench run folder" in err and (folder / "metrics.csv").read_text() == "mine"


# -- validate before creating anything (C10-C21, C35-C37) ---------------------------------------------
BAD = {
    "C10": ["--strategy", "replay", "--strategy-param", "buffer_size=-5"],
    "C11": ["--strategy", "replay", "--strategy-param", "buffer_size=true"],
    "C12": ["--strategy", "replay", "--strategy-param", "buffer_size=2.5"],
    "C14": ["--strategy", "replay", "--strategy-param", "bufer_size=5"],
    "C17": ["--param", "n_features=abc"],
    "C18": ["--param", "batch_size=0"],
    "C18b": ["--param", "batch_size=abc"],
    "C19": ["--param", "layers=[nosuch]"],
    "C20": ["--backbone", "nosuch_net"],
    "C21": ["--method", "patchcore", "--backbone", "nosuch_net"],
    "C35": ["--device", "cuda:abc"],
    "C35b": ["--device", "cuda:7"],
    "C36": ["--weights", "nonexistent.pth"],
    "C37": ["--weights", "GARBAGE"],
    "S09": ["--weights", "EVIL"],
}
EXPECTED = {"C10": "buffer_size", "C11": "buffer_size", "C12": "buffer_size", "C14": "bufer_size",
            "C17": "n_features", "C18": "batch_size", "C18b": "batch_size", "C19": "nosuch", "C20": "nosuch_net",
            "C21": "nosuch_net", "C35": "cuda:abc", "C35b": "cuda:7", "C36": "nonexistent.pth",
            "C37": "garbage.pth", "S09": "posix.system"}


@pytest.mark.parametrize("case", list(BAD))
def test_C10_to_C37_config_error_is_one_line_and_creates_no_folder(case: str, data_root: Path, tmp_path: Path,
                                                                   capsys) -> None:
    (tmp_path / "garbage.pth").write_bytes(os.urandom(300))
    _evil(tmp_path / "evil.pth", tmp_path / "code-ran")
    extra = [{"GARBAGE": str(tmp_path / "garbage.pth"), "EVIL": str(tmp_path / "evil.pth")}.get(a, a) for a in BAD[case]]
    out = tmp_path / "out"
    code, err = cli(run_args(data_root, out, "--name", "c", *extra), capsys)
    assert code == 2
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("clbench: error: ") and EXPECTED[case] in lines[0]
    assert not (out / "c").exists() and not (tmp_path / "code-ran").exists()


@pytest.mark.slow
def test_C10b_C10c_corrected_command_runs_and_resumes(data_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    replay = ["--name", "c10", "--strategy", "replay"]
    assert cli(run_args(data_root, out, *replay, "--strategy-param", "buffer_size=-5"), capsys)[0] == 2
    assert cli(run_args(data_root, out, *replay, "--strategy-param", "buffer_size=5"), capsys)[0] == 0  # C10b
    assert cli(run_args(data_root, out, *replay, "--strategy-param", "buffer_size=5", "--resume"), capsys)[0] == 0


def test_failure_before_the_first_step_removes_only_a_folder_it_created(data_root: Path, tmp_path: Path, capsys,
                                                                         monkeypatch) -> None:
    """A check that only fails in training (here: a ValueError from fit_task) leaves no stale folder
    behind; a folder that existed before the command is left as it was."""
    from methods.padim import PaDiM

    def fail(self, data):
        raise ValueError("method_params: something only training finds")

    monkeypatch.setattr(PaDiM, "fit_task", fail)
    out = tmp_path / "out"
    code, err = cli(run_args(data_root, out, "--name", "late"), capsys)
    assert code == 2 and "only training finds" in err and not (out / "late").exists()
    (out / "empty").mkdir()
    code, err = cli(run_args(data_root, out, "--name", "empty"), capsys)
    assert code == 2 and (out / "empty").is_dir()


def test_C27_malformed_yaml_names_line_and_column(data_root: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "cfg_bad.yaml"
    config.write_text("method: padim\ntasks: [a, b\nseed: 1\n")
    code, err = cli(run_args(data_root, tmp_path / "out", "--config", str(config)), capsys)
    assert code == 2 and f"{config}:3:5: invalid YAML" in err


# -- tracebacks -> one line (F01, F02, F10, F11, F11b, F14) -------------------------------------------
def test_F01_unwritable_output_folder_is_one_line(data_root: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    ro = tmp_path / "ro_out"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro else real_access(p, mode, **kw))
    code, err = cli(run_args(data_root, ro / "sub"), capsys)
    assert code == 2 and error_lines(err) == [f"clbench: error: output_dir: cannot write in {ro} (permission denied)"]
    monkeypatch.undo()

    def denied(self, *args, **kwargs):  # the file system says no after the check (root, ACLs, races)
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    code, err = cli(run_args(data_root, ro, "--name", "f01"), capsys)
    assert code == 1 and error_lines(err) == [f"clbench: error: {ro / 'f01'}: Permission denied"]


@pytest.mark.slow
def test_F01_unwritable_output_folder_for_real(data_root: Path, tmp_path: Path) -> None:
    """As the TSV ran it: root without the capabilities that bypass file permissions."""
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv")
    ro = tmp_path / "ro_out"
    ro.mkdir(mode=0o555)
    cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--inh-caps=-all",
           sys.executable, "-m", "clbench", *run_args(data_root, ro, "--name", "f01")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    if "setpriv:" in done.stderr:
        pytest.skip(done.stderr.strip())
    assert done.returncode in (1, 2) and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("clbench: error: ") and str(ro) in done.stderr


def test_F02_output_path_that_is_a_file(data_root: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "out_is_file"
    target.write_text("x")
    code, err = cli(run_args(data_root, target, "--name", "f02"), capsys)
    assert code == 2 and error_lines(err) == [f"clbench: error: output_dir: {target} exists and is not a folder"]
    code, err = cli(run_args(data_root, target / "deeper"), capsys)
    assert code == 2 and "is not a folder" in err and target.read_text() == "x"


def test_F10_file_size_limit_is_one_line(data_root: Path, tmp_path: Path, capsys) -> None:
    """``ulimit -f``: the checkpoint cannot be written (torch reports it as a RuntimeError)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, hard))
    try:
        code, err = cli(run_args(data_root, tmp_path / "out", "--name", "f10"), capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 1
    assert error_lines(err) == [error_lines(err)[0]] and "checkpoint.pt" in err and "file-size limit" in err
    assert not (tmp_path / "out" / "f10").exists()  # nothing completed: no stale folder either


@pytest.mark.slow
def test_F10_disk_full_keeps_what_was_written_and_resumes(data_root: Path, reference: Path, tmp_path: Path, capsys,
                                                          monkeypatch) -> None:
    real = atomic.write_csv
    calls = {"n": 0}

    def no_space(tmp: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")  # as write() reports it: no file name

    def full(path, frame):
        if Path(path).name == "metrics.csv":
            calls["n"] += 1
            if calls["n"] == 2:  # step 1's results
                return atomic.write_with(path, no_space)
        return real(path, frame)

    monkeypatch.setattr(atomic, "write_csv", full)
    out = tmp_path / "out"
    code, err = cli(run_args(data_root, out, "--name", "f10"), capsys)
    assert code == 1
    assert error_lines(err) == [f"clbench: error: {out / 'f10' / 'metrics.csv'}: No space left on device (disk full "
                                "or file-size limit: files already written are kept; free space, then --resume)"]
    monkeypatch.undo()
    assert cli(run_args(data_root, out, "--name", "f10", "--resume"), capsys)[0] == 0
    assert (out / "f10" / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()


@pytest.mark.parametrize("content,expected", [
    ("", "config.yaml: empty"),                                # F11
    ("method: [padim\n", "config.yaml:2:1: invalid YAML"),     # F11b
    ("- a\n- b\n", "not a run config, got a list"),
    (b"\xff\xfe\x00binary", "not a text file"),
], ids=["F11-empty", "F11b-malformed", "F11-list", "F11-binary"])
def test_F11_damaged_config_yaml_on_resume(content, expected: str, data_root: Path, copy, capsys) -> None:
    folder = copy()
    path = folder / "config.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, err = resume(data_root, folder, capsys)
    assert code == 2 and expected in err and "--overwrite" in err and len(error_lines(err)) == 1


# A clbench process that holds its run folder after its first checkpoint until it is interrupted, and
# says so on stdout: the test acts at a known moment, without polling or racing a run that may finish.
HOLD_AFTER_FIRST_CHECKPOINT = """
import faulthandler, signal, sys, time
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for every thread's stack if it hangs
# Ctrl-C as in a terminal: a test suite started in the background (nohup, `cmd &` in a script) hands its
# children SIGINT *ignored*, and Python then installs no KeyboardInterrupt handler: the run would hold forever
signal.signal(signal.SIGINT, signal.default_int_handler)
from clbench.engine import runner
from clbench.cli import main
save = runner.Experiment._checkpoint
def hold(self, *args, **kwargs):
    save(self, *args, **kwargs)
    print("held", flush=True)
    while True:
        time.sleep(0.05)
runner.Experiment._checkpoint = hold
sys.exit(main(sys.argv[1:]))
"""


def read_line(process: subprocess.Popen, seconds: float) -> str:
    """The next line the child writes on stdout ('' at its end), waiting at most ``seconds``."""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        assert selector.select(seconds), f"no line from pid {process.pid} in {seconds} s"
    return process.stdout.readline()


def wait_or_dump_stacks(process: subprocess.Popen, seconds: float) -> int:
    """The exit code of ``process`` within ``seconds``; past them, fail with the stacks of all its
    threads (faulthandler on SIGUSR1, registered by HOLD_AFTER_FIRST_CHECKPOINT) so a hang says where."""
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)
        time.sleep(2)
        process.kill()
        _, err = process.communicate()
        pytest.fail(f"pid {process.pid} still running {seconds} s after SIGINT; its threads:\n{err[-6000:]}")


@pytest.mark.slow
def test_F09_F14_locked_folder_and_ctrl_c(synthetic_root: Path, tmp_path: Path, capsys) -> None:
    """A second run on a folder in use is refused naming the pid; Ctrl-C exits 130, quietly, resumable."""
    out = tmp_path / "out"
    args = ["run", "--data-root", str(synthetic_root), "--tasks", "4", "--image-size", "64", "--weights", "none",
            "--device", "cpu", "--param", "n_features=40", "--no-progress", "--output", str(out), "--name", "f09"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-c", HOLD_AFTER_FIRST_CHECKPOINT, *args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = "?"
        while line not in ("held\n", ""):  # "" : it ended without holding
            line = read_line(first, 180)
        assert line == "held\n", first.stderr.read()
        code, err = cli(args + ["--overwrite"], capsys)
        assert code == 2 and f"{out / 'f09'}: in use by another clbench process (pid {first.pid})" in err
        first.send_signal(signal.SIGINT)
        assert wait_or_dump_stacks(first, 120) == 130
        err = first.stderr.read()
        assert "Traceback" not in err and err.strip().splitlines()[-1] == (
            "clbench: interrupted; run the same command with --resume to continue from the last completed step")
    finally:
        if first.poll() is None:
            first.kill()
    assert (out / "f09" / CHECKPOINT).is_file() and not (out / "f09" / "summary.json").exists()
    assert cli(args + ["--resume"], capsys)[0] == 0


def test_run_lock_is_reentrant_and_released(tmp_path: Path) -> None:
    folder = tmp_path / "cell"
    with run_lock(folder):
        with run_lock(folder):  # a sweep worker holding its cell, then the runner
            check_unlocked(folder)
        holder = subprocess.run([sys.executable, "-c", "from clbench.engine.locks import run_lock; import sys\n"
                                 f"with run_lock({str(folder)!r}): pass"], capture_output=True, text=True)
        assert holder.returncode == 1 and f"in use by another clbench process (pid {os.getpid()})" in holder.stderr
    with run_lock(folder):  # released
        pass
    assert issubclass(FolderLocked, ConfigError)


# -- leftovers, permissions, strict JSON (K5, K6) ------------------------------------------------------
def _kill_before_replace(monkeypatch, filename: str, nth: int) -> None:
    """Simulate SIGKILL just before the nth ``os.replace`` onto ``filename``: the temporary file
    stays, the target keeps its previous content, and the process stops."""
    real = atomic.atomic_path
    calls = {"n": 0}

    class Killed(BaseException):
        pass

    from contextlib import contextmanager

    @contextmanager
    def dying(path):
        with real(path) as tmp:
            yield tmp
            if Path(path).name == filename:
                calls["n"] += 1
                if calls["n"] == nth:
                    shutil.copy(tmp, tmp.with_name(tmp.name + "-kept"))
                    raise Killed
    monkeypatch.setattr(atomic, "atomic_path", dying)
    return Killed


@pytest.mark.parametrize("case,filename", [("K5", CHECKPOINT), ("K6", "metrics.csv")])
@pytest.mark.slow
def test_K5_K6_kill_before_rename_leaves_nothing_after_resume(case: str, filename: str, data_root: Path,
                                                              reference: Path, tmp_path: Path, capsys,
                                                              monkeypatch) -> None:
    killed = _kill_before_replace(monkeypatch, filename, 2)
    out = tmp_path / "out"
    with pytest.raises(killed):
        main(run_args(data_root, out, "--name", case))
    monkeypatch.undo()
    folder = out / case
    for kept in folder.glob("*-kept"):  # what a real kill leaves: .<name>.<random>.tmp
        kept.rename(kept.with_name(kept.name[: -len("-kept")]))
    leftovers = sorted(p.name for p in folder.glob(".*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].startswith(f".{filename}.")
    (folder / "notes.tmp").write_text("mine")  # not clbench's pattern: kept
    (folder / f".{filename}.tmp").write_text("mine")
    assert cli(run_args(data_root, out, "--name", case, "--resume"), capsys)[0] == 0
    assert sorted(p.name for p in folder.glob("*.tmp")) == [f".{filename}.tmp", "notes.tmp"]
    assert (folder / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()


def test_result_files_respect_the_umask(reference: Path) -> None:
    for name in ("config.yaml", "env.json", "metrics.csv", "summary.json", CHECKPOINT, FINGERPRINT, RUN_MARKER,
                 "plots/heatmap_pixel_auroc.png"):
        assert stat.S_IMODE((reference / name).stat().st_mode) == 0o644, name


def _strict_json(path: Path):
    def refuse(constant: str):
        raise ValueError(f"{path}: bare {constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_D12_nan_metric_is_null_and_named_not_averaged_away(data_root: Path, tmp_path: Path, capsys, caplog,
                                                            monkeypatch) -> None:
    """A metric undefined for a task (here pixel AUPRO of 'alpha', as with masks without a defect
    pixel) makes that metric's ACC/BWT/FM null in strict JSON, lists the task, and warns once."""
    import clbench.engine.runner as runner

    real = runner.evaluate_all

    def with_nan(*args, **kwargs):
        evaluation = real(*args, **kwargs)
        evaluation["alpha"]["pixel_aupro"] = float("nan")
        return evaluation

    monkeypatch.setattr(runner, "evaluate_all", with_nan)
    out = tmp_path / "out"
    code = main(run_args(data_root, out, "--name", "d12"))
    assert code == 0
    summary = _strict_json(out / "d12" / "summary.json")
    aupro = summary["metrics"]["pixel_aupro"]
    assert aupro["acc"] is None and aupro["bwt"] is None and aupro["fm"] is None
    assert aupro["undefined_tasks"] == ["alpha"] and aupro["final"]["alpha"] is None
    assert summary["metrics"]["pixel_auroc"]["acc"] is not None and "undefined_tasks" not in summary["metrics"]["pixel_auroc"]
    warnings = [r.getMessage() for r in caplog.records if "undefined" in r.getMessage()]
    assert warnings == ["warning: pixel_aupro is undefined (NaN) for task(s) 'alpha'; in summary.json its acc, bwt, "
                        "fm, relative_forgetting are null"]
    assert "pixel_aupro  ACC n/a  BWT n/a  FM n/a" in capsys.readouterr().out


def test_json_files_are_strict(reference: Path) -> None:
    for name in ("summary.json", "env.json", FINGERPRINT, RUN_MARKER):
        _strict_json(reference / name)


# -- resume verification (F05, F05b, F12, F13) ---------------------------------------------------------
def test_F13_missing_metrics_csv_never_replaces_a_good_summary(data_root: Path, copy, capsys) -> None:
    folder = copy()
    summary = (folder / "summary.json").read_bytes()
    (folder / "metrics.csv").unlink()
    code, err = resume(data_root, folder, capsys)
    assert code == 2 and f"{folder / 'metrics.csv'}: missing" in err
    assert (folder / "summary.json").read_bytes() == summary


@pytest.mark.parametrize("case", ["F05", "F05b", "F05-edited"])
def test_F05_truncated_or_short_metrics_csv_is_refused(case: str, data_root: Path, copy, capsys) -> None:
    folder = copy()
    path = folder / "metrics.csv"
    lines = path.read_text().splitlines(keepends=True)
    if case == "F05":  # truncated mid-line
        path.write_text("".join(lines)[: len("".join(lines)) - 7])
    elif case == "F05b":  # fewer steps than the checkpoint
        path.write_text("".join(line for line in lines if not line.startswith("1,")))
    else:
        path.write_text("".join(lines).replace("0.", "0.9", 1))
    summary = (folder / "summary.json").read_bytes()
    code, err = resume(data_root, folder, capsys)
    assert code == 2 and f"{path}: does not match checkpoint.pt" in err
    assert (folder / "summary.json").read_bytes() == summary


def _legacy(folder: Path) -> None:
    """The folder as an older clbench left it: no marker, no fingerprint, no rows in the checkpoint."""
    state = torch.load(folder / CHECKPOINT, weights_only=True)
    del state["results"]
    torch.save(state, folder / CHECKPOINT)
    (folder / RUN_MARKER).unlink()
    (folder / FINGERPRINT).unlink()


@pytest.mark.slow
def test_F05_legacy_checkpoint_checks_the_csvs(data_root: Path, copy, reference: Path, capsys, caplog) -> None:
    folder = copy()
    _legacy(folder)
    path = folder / "metrics.csv"
    good = path.read_bytes()
    path.write_bytes(good[: good.index(b"\n1,") + 1])  # F05b: step 1 missing
    code, err = resume(data_root, folder, capsys)
    assert code == 2 and f"{path}: has results for 1 step(s) but checkpoint.pt is after step 1" in err
    path.write_bytes(good[: good.rindex(b"pixel")] + b"pix")  # F05: truncated mid-line
    code, err = resume(data_root, folder, capsys)
    assert code == 2 and str(path) in err
    path.write_bytes(good)
    code, err = resume(data_root, folder, capsys)
    assert code == 0, err
    assert (folder / RUN_MARKER).is_file() and (folder / FINGERPRINT).is_file()
    assert any("no dataset fingerprint" in r.getMessage() for r in caplog.records)
    assert path.read_bytes() == (reference / "metrics.csv").read_bytes()


@pytest.mark.slow
def test_F12_changed_dataset_is_refused_naming_the_file(tmp_path: Path, capsys) -> None:
    data = tmp_path / "ds"
    write_category(data, "alpha")
    write_category(data, "beta", gray=True, seed=1)
    out = tmp_path / "out"
    assert main(run_args(data, out, "--name", "f12")) == 0
    capsys.readouterr()
    changed = data / "beta" / "test" / "spot" / "001.png"
    shutil.copyfile(data / "alpha" / "test" / "spot" / "001.png", changed)
    code, err = cli(run_args(data, out, "--name", "f12", "--resume"), capsys)
    assert code == 2 and f"{data}: the dataset changed since the run started: beta/test/spot/001.png" in err
    fingerprint = _strict_json(out / "f12" / FINGERPRINT)
    assert len(fingerprint["categories"]["beta"]) == 6 + 2 + 2 + 2  # train + test good/spot + masks
    time.sleep(0.01)
    write_category(data, "alpha")  # rewritten: same bytes, new times
    code, err = cli(run_args(data, out, "--name", "f12", "--resume"), capsys)
    assert code == 2 and "alpha/" in err


def test_resume_refuses_a_plots_link_out_of_the_run_folder(data_root: Path, copy, tmp_path: Path, capsys) -> None:
    """A results folder from someone else: its plots/ links to a folder of the user's."""
    folder = copy()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "heatmap_pixel_auroc.png").write_text("mine")
    (victim / ".notes.txt.abcdefgh.tmp").write_text("mine")  # clbench's temp-file pattern, but not clbench's
    shutil.rmtree(folder / "plots")
    (folder / "plots").symlink_to(victim)
    code, err = resume(data_root, folder, capsys)
    assert code == 2 and f"{folder / 'plots'}: is a symbolic link" in err
    assert sorted(p.name for p in victim.iterdir()) == [".notes.txt.abcdefgh.tmp", "heatmap_pixel_auroc.png"]
    assert (victim / "heatmap_pixel_auroc.png").read_text() == "mine"


def test_a_run_that_loses_a_race_deletes_nothing(data_root: Path, tmp_path: Path, monkeypatch) -> None:
    """Two fresh runs of one name: the loser (its folder made by the winner meanwhile) must not
    remove the winner's folder when it is refused."""
    from clbench.engine.config import RunConfig
    from clbench.engine.runner import Experiment

    config = RunConfig(data_root=str(data_root), synthetic=False, tasks=2, image_size=32, weights="none",
                       device="cpu", output_dir=str(tmp_path / "out"), name="race")
    experiment = Experiment(config, progress=False)
    winner = tmp_path / "out" / "race"

    def lose(results):
        (winner / "config.yaml").write_text("the winner's")
        raise FileExistsError(f"{winner}: run folder exists")

    monkeypatch.setattr(experiment, "_open_run_dir", lose)
    with pytest.raises(FileExistsError):
        experiment.run()
    assert (winner / "config.yaml").read_text() == "the winner's"


def test_debug_shows_the_traceback(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cuda:abc"):
        main(run_args(data_root, tmp_path / "out", "--device", "cuda:abc", "--debug"))
    with pytest.raises(ConfigError, match="cuda:abc"):
        main(["--debug", *run_args(data_root, tmp_path / "out", "--device", "cuda:abc")])
