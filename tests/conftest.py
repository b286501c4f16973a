"""Shared test set-up: a private download cache for the whole session, seeded without the network
where possible, so the tests run offline and never write into the user's own cache.

The project's code downloads its files into one cache folder ($LLM_CACHE_DIR). The tests point that
variable at a fresh temporary folder and copy into it the files they need, from the first place that
has each one:
  1. ../shared/data beside the clone (CI and this project's machines: exact copies of the downloads);
  2. the user's own cache ($LLM_CACHE_DIR or ~/.cache/llm-lifecycle, as the README describes),
     only read;
  3. the network, through the project's own download code, into the temporary folder.
A test that needs a file none of them can give is skipped with the reason: mark it (or its module,
with `pytestmark = pytest.mark.needs_files(...)`; subprocess tests need the mark) with
@pytest.mark.needs_files("cache/path", ...). A download that fails in-process inside a test or its
fixtures also becomes a skip. Only tests and .ci/run know about ../shared.

Under CI (CI=true with ../shared present) every file can be had, so a missing one FAILS its test
instead, and the session fails when any test skips for a reason not in EXPECTED_SKIPS: a green run
never hides a broken cache or a guard that skips what it should check.

run_in_process runs a stage script's command line in the test's own process (no Python start-up).
Every test starts from the same random seed.
"""
import importlib
import os
import random
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch



REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

import common  # noqa: E402  (after the path is set)
import download  # noqa: E402

# cache path -> its copy under ../shared/data: the cache layout of the project's download code
SEED_FILES = {
    "gpt2/encoder.json": "gpt2/encoder.json",
    "gpt2/vocab.bpe": "gpt2/vocab.bpe",
    "text/tinyshakespeare.txt": "text/tinyshakespeare.txt",
    "text/the-verdict.txt": "text/the-verdict.txt",
    "sms_spam/SMSSpamCollection": "sms_spam/SMSSpamCollection",
    "instruct/instruction-data.json": "instruct/instruction-data.json",
    "instruct/instruction-data-with-preference.json": "instruct/instruction-data-with-preference.json",
    "hf/mistralai/Mistral-7B-v0.1/tokenizer.model": "mistral/tokenizer.model",
}


def _user_cache() -> Path:
    return Path(os.environ.get(download.CACHE_ENV) or Path.home() / ".cache" / "llm-lifecycle")


def _download(relpath: str) -> None:
    """Fetch one file into the (temporary) cache with the project's own code; DownloadError if not."""
    if relpath == "sms_spam/SMSSpamCollection":
        import finetune_spam  # the zip is fetched and its member extracted and checked there
        finetune_spam.default_data()
    else:
        download.fetch(relpath)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_files(*cache_paths): skip unless these downloaded files can be had")


@pytest.fixture(scope="session", autouse=True)
def offline_cache(tmp_path_factory) -> Path:
    """Point LLM_CACHE_DIR at a fresh folder holding every file in SEED_FILES that can be had."""
    user_cache = _user_cache()
    cache = tmp_path_factory.mktemp("llm_cache")
    old = os.environ.get(download.CACHE_ENV)
    os.environ[download.CACHE_ENV] = str(cache)
    missing = {}
    for relpath, shared in SEED_FILES.items():
        target = cache / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        for source in (SHARED_DATA / shared, user_cache / relpath):
            if source.is_file():
                shutil.copyfile(source, target)
                break
        else:
            try:
                _download(relpath)
            except common.UserError as e:
                missing[relpath] = str(e)
    MISSING.update(missing)
    yield cache
    if old is None:
        os.environ.pop(download.CACHE_ENV, None)
    else:
        os.environ[download.CACHE_ENV] = old


MISSING: dict[str, str] = {}  # cache path -> why it could not be had, filled once per session

# The only reasons a test may skip under CI (each a start of the skip's reason); the README's "Set up"
# names this list. Everything else that skips there fails the run.
EXPECTED_SKIPS = (
    "downloads model weights from the Hugging Face Hub",  # README lines marked download:, unless LLM_TEST_DOWNLOADS=1
    "no C++ compiler for torch.compile",  # --compile on a CPU needs one; not every machine has it
    "Chromium is not installed",  # serve.py's chat page in a real browser (Debian's chromium package)
)


def strict() -> bool:
    """Under CI with ../shared beside the clone: a file that cannot be had is a failure, not a skip."""
    return os.environ.get("CI", "").lower() == "true" and SHARED_DATA.is_dir()


def unexpected_skips(reasons: list[str]) -> list[str]:
    """The skip reasons that EXPECTED_SKIPS does not allow."""
    return [r for r in reasons if not r.removeprefix("Skipped: ").startswith(EXPECTED_SKIPS)]


@pytest.fixture(autouse=True)
def _skip_without_needed_files(request, offline_cache):
    marker = request.node.get_closest_marker("needs_files")
    for relpath in marker.args if marker else ():
        if relpath in MISSING:
            reason = f"{relpath} is not available here: {MISSING[relpath]}"
            if strict():
                pytest.fail(f"under CI every file must be had: {reason}")
            pytest.skip(reason)


@pytest.fixture(autouse=True)
def _same_random_numbers_every_run():
    """Each test draws the same random numbers whatever ran before it, so a failure reproduces."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def _skip_on_download_error():
    """A download that fails inside a test or its fixtures means a file this machine cannot have
    (outside CI; under CI the DownloadError fails the test)."""
    try:
        return (yield)
    except download.DownloadError as e:
        if strict():
            raise
        pytest.skip(f"needs a file that cannot be downloaded here: {e}")


pytest_runtest_setup = pytest.hookimpl(wrapper=True)(_skip_on_download_error)
pytest_runtest_call = pytest.hookimpl(wrapper=True)(_skip_on_download_error)

SKIPPED: dict[str, str] = {}  # test id -> the reason it skipped, this session


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        SKIPPED[report.nodeid] = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)


def pytest_terminal_summary(terminalreporter):
    wrong = {test: SKIPPED[test] for test in SKIPPED if unexpected_skips([SKIPPED[test]])}
    if strict() and wrong:
        terminalreporter.section("skips that CI does not allow (tests/conftest.py EXPECTED_SKIPS)", red=True)
        for test, reason in wrong.items():
            terminalreporter.write_line(f"{test}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if strict() and unexpected_skips(list(SKIPPED.values())) and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def run_in_process(script: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """The script's own entry point, run_stage(main, parse_args), in this process: exit code, stdout, stderr.

    The same code path as the command line without a Python start-up per case; an exception that
    escapes run_stage (a traceback on the command line) fails the test, and so does a run of over 60 s
    (the cases are small; bad input must be refused before any real work starts)."""
    module = importlib.import_module(script.removesuffix(".py"))
    capsys.readouterr()

    def too_slow(signum, frame):
        raise TimeoutError(f"{script} {' '.join(argv)} was still running after 60 s")
    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(60)
    try:
        common.run_stage(module.main, lambda: module.parse_args(argv))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)  # sys.exit("message") prints it on the command line
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out = capsys.readouterr()
    return code, out.out, out.err
