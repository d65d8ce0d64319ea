import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `make test` runs one pytest-xdist worker per core: each computes on one thread; alone, pytest uses two.
torch.set_num_threads(1 if "PYTEST_XDIST_WORKER" in os.environ else min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed_and_cache(tmp_path_factory, monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setenv("MT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mt-cache"))


@pytest.fixture
def cli_error(capsys):
    """Run `mt` with these arguments, expecting a refusal: returns its one-line message
    (printed as `error: ...`, exit status 2, no traceback)."""
    from memorizing_transformers.cli import main

    def run(argv: list[str]) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in argv])
        assert exit_info.value.code == 2, f"exit status {exit_info.value.code}"
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith("error: "), err
        assert "Traceback" not in "\n".join(err)
        return err[-1].removeprefix("error: ")

    return run


@pytest.fixture
def device() -> torch.device:
    """Where the `device`-marked tests run: $MT_TEST_DEVICE (`make gpu-check` sets cuda), else the CPU."""
    name = os.environ.get("MT_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("MT_TEST_DEVICE asks for CUDA, and there is none here")
    return torch.device(name)
