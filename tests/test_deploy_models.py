"""``tabserve deploy-models`` deploys the bundled models to a running server."""

from __future__ import annotations

import subprocess
import sys

from helpers import ServerFactory


def test_deploy_models_then_query_them(server_factory: ServerFactory) -> None:
    server = server_factory(TABSERVE_WORKERS="1", TABPY_EVALUATE_TIMEOUT="60")
    result = subprocess.run(
        [sys.executable, "-m", "tabserve", "deploy-models", "--url", server.url],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "ttest:", "deployed", "anova:", "deployed", "PCA:", "deployed",
    ]  # fmt: skip
    status = server.get("/status").json()
    assert {name: s["status"] for name, s in status.items()} == {
        "ttest": "LoadSuccessful", "anova": "LoadSuccessful", "PCA": "LoadSuccessful",
    }  # fmt: skip
    pvalue = server.post("/query/ttest", json={"data": [[1.0, 2.0, 3.0, 4.0], [2.5]]}).json()
    assert 0 < pvalue["response"] <= 1
    anova = server.post("/query/anova", json={"data": [[1, 2, 3], [4, 5, 6], [7, 8, 9.5]]})
    assert anova.json()["response"] < 0.01
    pca = server.evaluate(
        "return tabpy.query('PCA', 1, _arg1, _arg2, _arg3)['response']",
        _arg1=[1.0, 2.0, 3.0, 4.0, 5.0], _arg2=[2.0, 1.0, 4.0, 3.0, 6.0],
        _arg3=["a", "b", "a", "b", "a"],
    )  # fmt: skip
    assert pca.status_code == 200, pca.text
    assert len(pca.json()) == 5
    again = subprocess.run(
        [sys.executable, "-m", "tabserve", "deploy-models", "--url", server.url],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert again.returncode == 0
    assert server.get("/status").json()["PCA"]["version"] == 2


def test_deploy_models_reports_an_unreachable_server() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tabserve", "deploy-models", "--url", "http://127.0.0.1:9/"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 1
    assert "ttest: failed" in result.stderr
