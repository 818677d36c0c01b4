"""lorakit demo digits: data loading (sklearn digits, MNIST IDX files), determinism, the experiment's claims."""

from __future__ import annotations

import argparse
import gzip
import json

import numpy as np
import pytest
import torch

import lorakit
from lorakit.demos import digit_data, digits

REQUIRED_KEYS = {"base_accuracy", "per_digit_errors_before", "worst_digit", "per_digit_errors_after",
                 "lora_accuracy", "disabled_identical", "base_weights_unchanged", "trainable_params",
                 "total_params", "adapter_bytes", "model_bytes", "seconds"}


def parse(*argv):
    p = argparse.ArgumentParser()
    digits.add_arguments(p)
    return p.parse_args(list(argv))


def run_cli(tmp_path, name, *argv):
    out = tmp_path / name
    args = parse("--out", str(out), "--json", str(out / "summary.json"), "--quiet", *argv)
    assert digits.run(args) == 0
    return json.loads((out / "summary.json").read_text())


# ------------------------------------------------------------------------------ IDX files
def write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    codes = {np.dtype("u1"): 0x08, np.dtype(">f4"): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + np.array(array.shape, ">u4").tobytes()
    raw = header + array.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    a = np.arange(2 * 3 * 4, dtype="u1").reshape(2, 3, 4)
    write_idx(tmp_path / "a", a, gz)
    np.testing.assert_array_equal(digit_data.read_idx(tmp_path / "a"), a)
    f = np.linspace(-1, 1, 6).astype(">f4")
    write_idx(tmp_path / "f", f, gz)
    np.testing.assert_array_equal(digit_data.read_idx(tmp_path / "f"), f)


def test_read_idx_errors(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01")
    with pytest.raises(digit_data.DatasetError, match="not an IDX file"):
        digit_data.read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((4, 2), "u1"))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(digit_data.DatasetError, match=r"expected 20 bytes for shape \[4, 2\], got 19"):
        digit_data.read_idx(tmp_path / "short")
    assert issubclass(digit_data.DatasetError, lorakit.LoraError)


def write_fake_mnist(folder, n_train=300, n_test=100, side=10, seed=0):
    """Images of side x side where digit d lights up row d (plus noise): learnable in a few steps."""
    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)

    def make(n):
        y = np.arange(n) % 10
        x = rng.integers(0, 60, (n, side, side))
        x[np.arange(n), y, :] = 255
        return x.astype("u1"), y.astype("u1")

    xtr, ytr = make(n_train)
    xte, yte = make(n_test)
    write_idx(folder / "train-images-idx3-ubyte.gz", xtr, gz=True)     # gzipped
    write_idx(folder / "train-labels-idx1-ubyte", ytr)                  # plain
    write_idx(folder / "t10k-images.idx3-ubyte", xte)                   # the dotted spelling of some mirrors
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", yte, gz=True)


def test_mnist_missing_files_are_named(tmp_path):
    write_fake_mnist(tmp_path / "m")
    (tmp_path / "m" / "t10k-labels-idx1-ubyte.gz").unlink()
    (tmp_path / "m" / "t10k-images.idx3-ubyte").unlink()
    with pytest.raises(digit_data.DatasetError) as e:
        digit_data.load_mnist(str(tmp_path / "m"))
    assert "t10k-images-idx3-ubyte" in str(e.value) and "t10k-labels-idx1-ubyte" in str(e.value)
    assert "train-images" not in str(e.value)
    with pytest.raises(digit_data.DatasetError, match="no such folder"):
        digit_data.load_mnist(str(tmp_path / "nowhere"))


def test_mnist_labels_must_match_images(tmp_path):
    write_fake_mnist(tmp_path / "m")
    write_idx(tmp_path / "m" / "train-labels-idx1-ubyte", np.zeros(7, "u1"))
    with pytest.raises(digit_data.DatasetError, match="expected images"):
        digit_data.load_mnist(str(tmp_path / "m"))


def test_mnist_end_to_end(tmp_path):
    write_fake_mnist(tmp_path / "m")
    s = run_cli(tmp_path, "run", "--dataset", "mnist", "--data-dir", str(tmp_path / "m"), "--hidden", "32,32",
                "--pretrain-steps", "30", "--steps", "10", "--no-figure")
    assert s["disabled_identical"] is True and s["base_weights_unchanged"] is True
    assert s["config"]["dataset"] == "mnist"
    assert s["base_params"] == 100 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10           # 10x10 images -> 100 inputs
    assert sum(s["per_digit_errors_before"]) == round((1 - s["base_accuracy"]) * 100)
    assert s["figure_path"] is None


# ------------------------------------------------------------------------------ digits data
def test_digits_split_is_seeded_stratified_and_disjoint():
    a, b, c = (digit_data.load_data("digits", None, seed) for seed in (0, 0, 1))
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.y_test, c.y_test) or not torch.equal(a.x_test, c.x_test)
    assert len(a.x_train) + len(a.x_test) == 1797 and a.n_features == 64
    total = torch.bincount(torch.cat([a.y_train, a.y_test]), minlength=10)
    assert torch.bincount(a.y_test, minlength=10).tolist() == [round(0.3 * int(n)) for n in total]
    assert float(a.x_train.min()) >= 0.0 and float(a.x_train.max()) == 1.0
    rows_train = {tuple(r) for r in a.x_train.tolist()}
    assert sum(tuple(r) in rows_train for r in a.x_test.tolist()) < 10   # only duplicate images may repeat


def test_config_validation():
    with pytest.raises(lorakit.ConfigError, match="--data-dir"):
        digits.config_from_args(parse("--dataset", "mnist"))
    with pytest.raises(lorakit.ConfigError, match="--hidden"):
        digits.config_from_args(parse("--hidden", "a,b"))
    with pytest.raises(lorakit.ConfigError, match="--rank"):
        digits.config_from_args(parse("--rank", "0"))
    cfg = digits.config_from_args(parse())
    assert (cfg.rank, cfg.alpha, cfg.steps, cfg.hidden, cfg.dataset) == (1, None, 100, (1000, 2000), "digits")


# ------------------------------------------------------------------------------ the experiment
def test_two_runs_give_the_same_numbers(tmp_path):
    a = run_cli(tmp_path, "a", "--steps", "5", "--pretrain-steps", "20", "--seed", "3", "--no-figure")
    b = run_cli(tmp_path, "b", "--steps", "5", "--pretrain-steps", "20", "--seed", "3", "--no-figure")
    assert REQUIRED_KEYS <= set(a)
    volatile = {"seconds", "adapter_path", "model_path", "figure_path", "config"}
    assert {k: v for k, v in a.items() if k not in volatile} == {k: v for k, v in b.items() if k not in volatile}
    assert a["config"] | {"out": None} == b["config"] | {"out": None}
    assert a["base_params"] == 64 * 1000 + 1000 + 1000 * 2000 + 2000 + 2000 * 10 + 10 == 2_087_010
    assert a["trainable_params"] == a["lora_params"] == (64 + 1000) + (1000 + 2000) + (2000 + 10)
    assert a["total_params"] == a["base_params"] + a["lora_params"]
    assert isinstance(a["seconds"], float) and a["seconds"] > 0


def test_the_lesson_of_the_experiment(tmp_path, capsys):
    args = parse("--out", str(tmp_path / "run"), "--hidden", "128,256", "--json", str(tmp_path / "s.json"))
    assert digits.run(args) == 0
    printed = capsys.readouterr().out
    for step in range(1, 8):
        assert f"[{step}/7]" in printed
    assert "lora_A" in printed and "LoRA adds" in printed and "Expected" in printed
    s = json.loads((tmp_path / "s.json").read_text())
    w = s["worst_digit"]
    before, after = s["per_digit_errors_before"], s["per_digit_errors_after"]
    assert before[w] == max(before) and before[w] >= 5
    assert after[w] <= before[w] // 3                                    # the worst digit's errors drop sharply
    assert s["disabled_identical"] is True and s["base_weights_unchanged"] is True
    assert s["per_digit_errors_disabled"] == before and s["disabled_accuracy"] == s["base_accuracy"]
    adapter_file = tmp_path / "run" / "adapter" / "adapter_model.safetensors"
    assert s["adapter_bytes"] == adapter_file.stat().st_size < s["model_bytes"] / 20
    assert s["model_bytes"] == (tmp_path / "run" / "base_model.safetensors").stat().st_size
    assert (tmp_path / "run" / "digits_errors.png").read_bytes()[:4] == b"\x89PNG"

    # the saved files reproduce the LoRA-enabled result: base weights + adapter, loaded fresh
    from safetensors.torch import load_file
    data = digit_data.load_data("digits", None, 0)
    model = digits.build_mlp(64, (128, 256))
    model.load_state_dict(load_file(str(tmp_path / "run" / "base_model.safetensors")))
    lorakit.load_adapter(model, tmp_path / "run" / "adapter")
    _, acc, wrong = digits.evaluate(model.eval(), data.x_test, data.y_test)
    assert wrong == after and acc == s["lora_accuracy"]
