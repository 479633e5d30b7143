"""A few steps of each recipe at tiny sizes, the real-data loaders, and the ``kdfast`` command's errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from kdfast import cli
from kdfast.train import data
from kdfast.train.recipes import gini, slotmatch, wecolora
from kdfast.train.recipes._common import Options, format_report


# Tiny evaluation sets (and a smaller ViT): a few steps of each recipe in seconds.
TINY = {"gini": {"eval_samples": 48, "seeds": "2"}, "slotmatch": {"eval_videos": 6, "student_seeds": "1"},
        "wecolora": {"probe_train": 36, "held_out": 24, "few_shot_per_class": 2, "depth": 4, "embed_dim": 32}}


@pytest.fixture(autouse=True)
def _small(monkeypatch):
    """One thread, and KDFAST_BACKEND restored after the recipe sets it."""
    monkeypatch.setenv("KDFAST_BACKEND", "auto")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _options(tmp_path, recipe, **overrides) -> Options:
    return Options(**{"steps": 2, "batch_size": 4, "device": "cpu", "out": str(tmp_path), "progress": False,
                      "overrides": dict(TINY[recipe]), **overrides})


def test_gini_recipe(tmp_path):
    report = gini.run(_options(tmp_path, "gini"))  # digits (scikit-learn), 2 seeds, clean and 20% label noise
    assert [(row["label noise"], row["seed"], row["run"]) for row in report["rows"]] == [
        (noise, seed, run) for noise in ("0%", "20%") for seed in (0, 1) for run in ("ce", "ce+gini+kl")]
    assert all(0 <= row["held-out accuracy"] <= 1 and row["steps"] == 2 for row in report["rows"])
    assert report["held-out samples"] == 540 and report["classes"] == 10
    summary = json.loads((tmp_path / "report.json").read_text())["summary"]
    assert {"accuracy_ce_mean", "accuracy_ce_std", "accuracy_gini_kl_mean", "accuracy_gini_kl_std", "seeds",
            "seconds"} <= set(summary) and summary["seeds"] == [0, 1]
    ce = [row["held-out accuracy"] for row in report["rows"][:4] if row["run"] == "ce"]
    assert summary["accuracy_ce_mean"] == pytest.approx(sum(ce) / 2)
    assert "| ce+gini+kl" in format_report(report) and "20% of the training labels flipped" in report["conclusion"]
    assert (tmp_path / "curves.png").exists() == (report["pictures"] == ["curves.png"])


def test_report_says_why_it_has_no_pictures():
    report = {"recipe": "gini", "pictures": [], "settings": {"pictures": False}}
    assert "pictures: none (--set pictures=false)" in format_report(report)
    report["settings"]["pictures"] = True  # asked for, none written: Pillow is missing
    assert "pictures: none (they need Pillow: pip install pillow)" in format_report(report)
    report["pictures"] = ["curves.png"]
    assert "pictures: curves.png" in format_report(report)


def test_gini_label_noise_is_fixed_and_flips_the_given_fraction():
    train, _ = gini.digits()
    a, b = gini.noisy(train, 10, 20), gini.noisy(train, 10, 20)
    flipped = a.tensors["label"] != train.tensors["label"]
    assert torch.equal(a.tensors["label"], b.tensors["label"]) and int(flipped.sum()) == round(0.2 * len(train))


def test_slotmatch_recipe_and_teacher_from_a_checkpoint(tmp_path):
    report = slotmatch.run(_options(tmp_path / "a", "slotmatch", overrides={**TINY["slotmatch"], "student_seeds": "2"}))
    teacher, student, alone, *others = report["rows"]
    assert [(row["model"], row["seed"]) for row in report["rows"][1:]] == [
        (model, seed) for seed in (0, 1) for model in ("student (SlotMatch)", "student alone")]
    assert teacher["parameters"] > student["parameters"] == alone["parameters"] > 0
    for row in report["rows"]:
        for masks in ("decoder", "attention", "token ceiling"):
            assert -1 <= row[f"FG-ARI ({masks})"] <= 1 and 0 <= row[f"mBO ({masks})"] <= 1
        assert row["frames/s (inference)"] > 0
    summary = json.loads((tmp_path / "a" / "report.json").read_text())["summary"]
    assert {"teacher_fg_ari", "student_fg_ari", "fg_ari_ceiling", "parameter_ratio", "inference_speedup",
            "seconds", "student_alone_fg_ari", "distillation_gain"} <= set(summary)
    assert summary["teacher_fg_ari"] == teacher["FG-ARI (attention)"]
    assert summary["student_fg_ari"] == pytest.approx((student["FG-ARI (attention)"] + others[0]["FG-ARI (attention)"]) / 2)
    assert summary["distillation_gain"] == pytest.approx(summary["student_fg_ari"] - summary["student_alone_fg_ari"])
    if report["pictures"]:
        assert report["pictures"] == ["curves.png", "masks.png"] and (tmp_path / "a" / "masks.png").exists()
    loaded = slotmatch.run(_options(tmp_path / "b", "slotmatch", teacher=str(tmp_path / "a" / "teacher" / "checkpoint.pt")))
    assert loaded["rows"][0]["trained"].startswith("loaded")
    assert loaded["rows"][0]["FG-ARI (decoder)"] == teacher["FG-ARI (decoder)"]  # the same teacher and videos


def test_token_ceiling_labels_each_token_by_its_most_frequent_object():
    true = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    true[0, 0, 0, 0] = 1  # one object pixel in the top-left 2x2 token: the token is the object's
    true[0, 0, 2:, 2:] = torch.tensor([[2, 2], [3, 0]])  # bottom-right token: object 2 (2 pixels) over 3 (1)
    ceiling = slotmatch.token_ceiling(true, (2, 2))[0, 0]
    assert ceiling[:2, :2].eq(1).all() and ceiling[2:, 2:].eq(2).all() and ceiling[:2, 2:].eq(0).all()
    # On the pixel grid itself the true masks are their own ceiling.
    assert torch.equal(slotmatch.token_ceiling(true, (4, 4)), true)


def test_invariant_slot_attention_step_equals_relative_keys_and_values():
    """One iteration on the extended keys and queries equals slot attention with k_ij = k_j + W_k phi(r_ij),
    v_ij = v_j + W_v phi(r_ij), r_ij = (p_j - mu_i) / sigma_i, written out per (slot, token) pair in float64."""
    from kdfast.train.recipes.slotmatch_models import InvariantGrouper, relative

    torch.manual_seed(0)
    grouper = InvariantGrouper(6, 8, 16, num_tokens=16, grad_last_only=False).double()
    b, k = 2, 3
    slots, features = torch.randn(b, k, 8, dtype=torch.float64), torch.randn(b, 16, 6, dtype=torch.float64)
    pos = torch.rand(b, k, 2, dtype=torch.float64) * 2 - 1
    scale = torch.rand(b, k, 2, dtype=torch.float64) * 0.5 + 0.2
    out = grouper(slots, pos, scale, features, n_iters=1)

    layers = grouper.layers
    normed_features = layers.norm_features(features)
    phi = relative(grouper.monomials[:, 1:3], pos, scale)  # (B, K, N, 5)
    keys = layers.to_k(normed_features)[:, None] + grouper.rel_k(phi)
    values = layers.to_v(normed_features)[:, None] + grouper.rel_v(phi)
    normed = layers.norm_slots(slots)
    attn = (torch.einsum("bkd,bknd->bkn", layers.to_q(normed), keys) * layers.scale).softmax(1)
    weights = (attn + layers.eps) / (attn + layers.eps).sum(-1, keepdim=True)
    updates = torch.einsum("bkn,bknd->bkd", weights, values)
    expected = layers.mlp(layers.gru(updates.flatten(0, 1), normed.flatten(0, 1)).unflatten(0, (b, k)))
    grid = grouper.monomials[:, 1:3]
    mean = torch.einsum("bkn,nc->bkc", weights, grid)
    std = torch.einsum("bkn,bknc->bkc", weights, (grid[None, None] - mean[:, :, None]) ** 2).sqrt()
    torch.testing.assert_close(out["masks"], attn)
    torch.testing.assert_close(out["slots"], expected)
    torch.testing.assert_close(out["positions"], mean)
    torch.testing.assert_close(out["scales"], std.clamp_min(grouper.min_scale))


def test_wecolora_recipe(tmp_path):
    report = wecolora.run(_options(tmp_path, "wecolora"))
    teacher, copy, student, qv = report["rows"]
    assert teacher["feature L1 to teacher"] == 0 and copy["feature L1 to teacher"] > 0
    assert student["blocks"] == copy["blocks"] == teacher["blocks"] // 2
    assert qv["trainable"] < student["trainable"] < student["parameters"]
    summary = json.loads((tmp_path / "report.json").read_text())["summary"]
    assert {"probe_teacher", "probe_weight_copy", "probe_wecolora", "feature_l1_weight_copy", "feature_l1_wecolora",
            "seconds"} <= set(summary) and summary["probe_wecolora"] == student["linear-probe accuracy"]


# Convergence: each recipe's models trained a few steps on the kdfast kernels and on the eager reference give
# the same losses step by step, up to float32 rounding (the way kernel libraries test convergence).
CONVERGENCE = {"slotmatch": ("student", {"student_alone": "false", "attention_weight": "0.1"}), "wecolora": ("student", {}),
               "gini": ("ce+gini+kl_noise0_seed0", {"gini_warmup_steps": "0", "seeds": "1", "label_noise": "0"})}


@pytest.mark.parametrize("recipe", sorted(CONVERGENCE))
def test_reference_backend_gives_the_same_losses(tmp_path, recipe):
    module = {"gini": gini, "slotmatch": slotmatch, "wecolora": wecolora}[recipe]
    phase, extra = CONVERGENCE[recipe]
    losses = {}
    for backend in ("auto", "reference"):
        options = _options(tmp_path / backend, recipe, backend=backend, steps=5)
        options.overrides.update(extra, pictures="false")
        module.run(options)
        lines = (tmp_path / backend / phase / "metrics.jsonl").read_text().splitlines()
        losses[backend] = torch.tensor([json.loads(line)["loss"] for line in lines])
    assert len(losses["auto"]) == 5
    torch.testing.assert_close(losses["auto"], losses["reference"], rtol=1e-4, atol=1e-6)


def test_real_image_data(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cifar.npz", x=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), y=np.arange(20) % 3)
    dataset = data.open_image_data(tmp_path / "cifar.npz")
    assert dataset[0]["image"].shape == (3, 32, 32) and dataset.num_classes == 3
    report = gini.run(_options(tmp_path / "run", "gini", data=str(tmp_path / "cifar.npz")))
    assert report["classes"] == 3 and report["held-out samples"] == 2

    image = pytest.importorskip("PIL.Image")
    for label in ("cat", "dog"):
        (tmp_path / "folder" / label).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            image.fromarray(pixels).save(tmp_path / "folder" / label / f"{i}.png")
    folder = data.open_image_data(tmp_path / "folder", size=32)
    assert len(folder) == 6 and folder[0]["image"].shape == (3, 32, 32) and folder.num_classes == 2


def test_real_video_data(tmp_path):
    features, masks = torch.randn(3, 9, 16, 8), torch.randint(0, 4, (3, 9, 12, 12))
    torch.save({"features": features, "masks": masks}, tmp_path / "features.pt")
    np.save(tmp_path / "features.npy", features.numpy())
    clips = data.open_video_data(tmp_path / "features.pt", num_frames=4)
    assert len(clips) == 6 and clips[0]["features"].shape == (4, 16, 8) and clips[0]["masks"].shape == (4, 12, 12)
    torch.testing.assert_close(clips[1]["features"], features[0, 4:8])
    assert "masks" not in data.open_video_data(tmp_path / "features.npy", num_frames=4)[0]
    report = slotmatch.run(_options(tmp_path / "run", "slotmatch", data=str(tmp_path / "features.pt")))
    assert report["tokens per frame"] == 16 and "FG-ARI (decoder)" in report["rows"][1]

    image = pytest.importorskip("PIL.Image")
    for v in range(2):
        (tmp_path / "frames" / f"v{v}" / "masks").mkdir(parents=True)
        for t in range(5):
            image.fromarray(np.full((32, 32, 3), 40 * t, dtype=np.uint8)).save(tmp_path / "frames" / f"v{v}" / f"{t:03d}.png")
            image.fromarray(np.full((32, 32), t % 3, dtype=np.uint8)).save(tmp_path / "frames" / f"v{v}" / "masks" / f"{t:03d}.png")
    video = data.open_video_data(tmp_path / "frames", num_frames=4)
    assert len(video) == 2 and video[0]["video"].shape == (4, 3, 32, 32) and video[0]["masks"][2].unique().tolist() == [2]


def test_synthetic_data_is_a_function_of_the_seed():
    a, b = data.MovingShapes(num_samples=3, seed=5), data.MovingShapes(num_samples=3, seed=5, cache=False)
    for key in ("video", "masks"):
        assert torch.equal(a[2][key], b[2][key]) and torch.equal(a[2][key], a[2][key])
    masks = a[0]["masks"]
    assert masks.shape == (4, 32, 32) and 3 <= len(masks.unique()) - 1 <= 6  # 3-6 objects (a few may be hidden)
    assert not torch.equal(a[0]["video"], data.MovingShapes(num_samples=3, seed=6)[0]["video"])
    shapes = data.Shapes(num_samples=4)
    assert shapes[3]["image"].shape == (3, 32, 32) and 0 <= int(shapes[3]["label"]) < data.Shapes.num_classes


def test_cli_errors_are_clear(tmp_path, capsys):
    assert cli.main(["train", "nope"]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err
    assert cli.main(["train", "gini", "--data", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["train", "gini", "--resume", "--out", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
    assert cli.main(["train", "slotmatch", "--teacher", str(tmp_path / "bad.pt"), "--out", str(tmp_path)]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    assert cli.main(["train", "gini", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_kdfast_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "reference: available" in out and "torch:" in out


def test_python_m_kdfast_runs_the_command():
    command = [sys.executable, "-m", "kdfast", "train", "nope"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "unknown recipe 'nope'" in done.stderr


def test_bad_data_is_rejected_when_loaded_naming_the_file(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.random((6, 3, 32, 32), dtype=np.float32)
    images[4, 1, 2, 3] = np.nan
    np.savez(tmp_path / "nan.npz", x=images, y=np.arange(6) % 2)
    with pytest.raises(ValueError, match=r"nan.npz:x holds non-finite values \(1 of 18432\), the first nan at index "
                                         r"\[4, 1, 2, 3\]"):
        data.open_image_data(tmp_path / "nan.npz")
    features = torch.randn(2, 4, 16, 8)
    features[1, 2, 3, 4] = float("inf")
    torch.save({"features": features}, tmp_path / "inf.pt")
    with pytest.raises(ValueError, match=r"inf.pt:features holds non-finite .* first inf at index \[1, 2, 3, 4\]"):
        data.open_video_data(tmp_path / "inf.pt")
    torch.save({"features": torch.randn(2, 4, 16, 8), "masks": torch.zeros(2, 3, 8, 8, dtype=torch.long)},
               tmp_path / "masks.pt")
    with pytest.raises(ValueError, match=r"masks.pt'?: masks must be integer \(V, T, H, W\) with the features' V, T"):
        data.open_video_data(tmp_path / "masks.pt")
    np.savez(tmp_path / "labels.npz", x=images[:4] * 0, y=np.array([0, 1, -1, 2]))
    with pytest.raises(ValueError, match=r"labels.npz:y holds a negative class label \(-1\) at index 2"):
        data.open_image_data(tmp_path / "labels.npz")
    for name in ("garbled.npz", "garbled.npy", "garbled.pt"):
        (tmp_path / name).write_bytes(b"\x93NUMPY garbage" * 3)
        with pytest.raises(ValueError, match=rf"--data: cannot read '.*{name}' as an? (torch|\.np[yz]) file \(\w+"):
            (data.open_image_data if name.endswith("z") else data.open_video_data)(tmp_path / name)


def test_npz_images_are_resized_to_the_recipe_size(tmp_path):
    np.savez(tmp_path / "big.npz", x=np.zeros((3, 48, 48, 3), dtype=np.uint8), y=np.arange(3))
    assert data.open_image_data(tmp_path / "big.npz", size=32)[0]["image"].shape == (3, 32, 32)
