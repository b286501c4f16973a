"""Under CI a broken download cache or a stale guard cannot turn into a green run: a missing file
fails its test, and a skip for any reason outside conftest.EXPECTED_SKIPS fails the session."""
import subprocess
import sys

import pytest

import conftest
from conftest import REPO

SAMPLE = '''
import download
import pytest

def test_a_download_that_fails():
    raise download.DownloadError("no network here")

def test_a_guard_that_skips():
    pytest.skip("model.py has no such preset yet")

def test_an_expected_skip():
    pytest.skip("no C++ compiler for torch.compile")

def test_passes():
    assert True
'''


def run_sample(tmp_path, ci: str, *select: str) -> subprocess.CompletedProcess:
    """The sample tests above under the project's own conftest (loaded by path, under another name)."""
    (tmp_path / "conftest.py").write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('project_conftest', {str(REPO / 'tests' / 'conftest.py')!r})\n"
        "project = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(project)\n"
        "globals().update({k: v for k, v in vars(project).items() if not k.startswith('__')})\n")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {**__import__("os").environ, "CI": ci}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *select, str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)


@pytest.mark.skipif(not conftest.SHARED_DATA.is_dir(), reason="CI mode needs ../shared beside the clone")
def test_under_ci_a_download_failure_fails_its_test(tmp_path):
    result = run_sample(tmp_path, "true", "-k", "not guard")
    assert result.returncode == 1, result.stdout
    assert "1 failed, 1 passed, 1 skipped" in result.stdout and "no network here" in result.stdout
    assert "skips that CI does not allow" not in result.stdout  # the compiler's skip is on the list


@pytest.mark.skipif(not conftest.SHARED_DATA.is_dir(), reason="CI mode needs ../shared beside the clone")
def test_under_ci_a_skip_off_the_list_fails_a_run_that_otherwise_passes(tmp_path):
    result = run_sample(tmp_path, "true", "-k", "guard or expected or passes")
    assert "1 passed, 2 skipped" in result.stdout
    assert result.returncode == 1, result.stdout
    unlisted = result.stdout[result.stdout.index("skips that CI does not allow"):]
    assert "test_a_guard_that_skips" in unlisted and "test_an_expected_skip" not in unlisted


def test_outside_ci_a_download_failure_is_a_skip_and_the_run_passes(tmp_path):
    result = run_sample(tmp_path, "")
    assert result.returncode == 0, result.stdout
    assert "1 passed, 3 skipped" in result.stdout and "cannot be downloaded here" in result.stdout


def test_expected_skips_are_the_readme_lines_and_the_compiler():
    allowed = ["Skipped: downloads model weights from the Hugging Face Hub (set LLM_TEST_DOWNLOADS=1 to run it)",
               "no C++ compiler for torch.compile"]
    assert conftest.unexpected_skips(allowed) == []
    missing = "gpt2/vocab.bpe is not available here: no network"
    assert conftest.unexpected_skips([*allowed, missing]) == [missing]
