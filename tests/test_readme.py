"""The README's self-contained Python examples run as written (the LoRA explanation and the API guide)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    runnable = [b for b in blocks if re.search(r"^import .*\blorakit\b", b, re.M)]
    assert len(runnable) >= 2
    monkeypatch.chdir(tmp_path)                     # the examples write out/...
    scope: dict = {}
    for block in runnable:
        exec(compile(block, str(README), "exec"), scope)
    report = scope["report"]
    assert (report.trainable, report.base) == (50_000, 25_000_000)    # d = k = 5000, r = 5
    assert scope["lorakit"].adapter_names(scope["plain"]) == []
    assert (tmp_path / "out" / "sql" / "adapter_model.safetensors").is_file()
