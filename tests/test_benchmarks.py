"""The two benchmark scripts run end to end on tiny inputs (their figures are measured elsewhere)."""

from reference import REPO_ROOT, SMALL_TREE, run_command


def test_bench_inference_runs_on_untrained_models_of_a_config(tmp_path):
    done = run_command([REPO_ROOT / "benchmarks" / "bench_inference.py", "--config", REPO_ROOT / "configs" /
                        "cifar100-6-deep.toml", "--images", "64", "--single", "4", "--repeats", "1",
                        "--batch-size", "32"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "routed tree" in done.stdout


def test_bench_recipes_runs_and_summarises(tmp_path, small_data_dir):
    (tmp_path / "tree.toml").write_text(SMALL_TREE)
    done = run_command([REPO_ROOT / "benchmarks" / "bench_recipes.py", "--config", tmp_path / "tree.toml",
                        "--data", small_data_dir, "--seeds", "0", "--max-epochs", "1", "--out", tmp_path / "b"],
                       cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "default / original total time:" in done.stdout and (tmp_path / "b" / "summary.json").is_file()
    assert "parent accuracy" in done.stdout and "± " not in done.stdout.split("parent accuracy")[1].splitlines()[0]


def test_bench_kinds_runs_and_summarises(tmp_path):
    from synthetic import make_synthetic

    data = make_synthetic(tmp_path / "data", ["beaver", "whale", "wolf", "sunflower", "forest", "oak_tree"],
                          n_train=12, n_test=4)
    done = run_command([REPO_ROOT / "benchmarks" / "bench_kinds.py", "--data", data, "--seeds", "0", "--kinds",
                        "mlp,cnn", "--max-epochs", "1", "--out", tmp_path / "b"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "cnn / mlp time per seed:" in done.stdout and "parent MFLOPs per image" in done.stdout
    summary = (tmp_path / "b" / "summary.json").read_text()
    assert '"mlp"' in summary and '"cnn"' in summary


def test_bench_deploy_same_and_speed_run_on_a_small_tree(tmp_path, small_data_dir):
    (tmp_path / "tree.toml").write_text(SMALL_TREE)
    done = run_command(["-m", "branching", "run", "--config", tmp_path / "tree.toml", "--data", small_data_dir, "--out",
                        tmp_path / "run", "--max-epochs", "1", "--quiet", "--no-report", "--no-download"], cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    bench = REPO_ROOT / "benchmarks" / "bench_deploy.py"
    same = run_command([bench, "same", "--models", tmp_path / "run", "--data", small_data_dir], cwd=tmp_path)
    assert same.returncode == 0, same.stderr
    n = same.stdout.split("API against branching predict: ")[1].split(" of ")[1].split()[0]
    for line in ("API against branching predict", "ONNX graph against PyTorch", "server (16 concurrent clients)"):
        assert f"{line}" in same.stdout and f": {n} of {n} images" in same.stdout.split(line)[1].splitlines()[0]
    speed = run_command([bench, "speed", "--models", tmp_path / "run", "--data", small_data_dir, "--sizes", "1,4",
                         "--repeats", "1"], cwd=tmp_path)
    assert speed.returncode == 0, speed.stderr
    assert [line.split()[0] for line in speed.stdout.splitlines()[2:]] == ["1", "4"]


def test_bench_exits_fit_guarantee_and_speed_run_on_a_tiny_tree_with_exits(tmp_path, small_data_dir, monkeypatch):
    import pytest
    import torch
    efficientnet = pytest.importorskip("efficientnet_lite_pytorch")
    from test_pretrained import tree
    weights = tmp_path / "lite0-random.pth"  # random weights at 32 px, as test_pretrained's fixture saves them
    torch.manual_seed(0)
    torch.save(efficientnet.EfficientNet.from_name("efficientnet-lite0", image_size=32).state_dict(), weights)
    exits = 'exits = ["block3", "block6"]\n\n[parent.cascade]\nrisk = 0.6\ndelta = 0.2\n'  # as test_exits.py's
    (tmp_path / "tree.toml").write_text(tree(weights, extra_parent=exits))
    monkeypatch.setenv("BRANCHING_CACHE", str(tmp_path / "cache"))
    bench = REPO_ROOT / "benchmarks" / "bench_exits.py"
    fit = run_command([bench, "fit", "--config", tmp_path / "tree.toml", "--data", small_data_dir, "--seeds", "0",
                       "--max-epochs", "2", "--out", tmp_path / "b"], cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr
    assert "risk share of full" in fit.stdout and (tmp_path / "b" / "exits-curve.png").is_file()
    models = tmp_path / "b" / "seed-0"
    guarantee = run_command([bench, "guarantee", "--models", models, "--data", small_data_dir, "--splits", "20"],
                            cwd=tmp_path)
    assert guarantee.returncode == 0, guarantee.stderr
    assert "Learn-then-Test (bound <= r)" in guarantee.stdout and "empirical error <= r" in guarantee.stdout
    speed = run_command([bench, "speed", "--models", models, "--data", small_data_dir, "--n", "8", "--repeats", "1",
                         "--onnx"], cwd=tmp_path)
    assert speed.returncode == 0, speed.stderr
    assert "cascade at batch 256 against batch 1: " in speed.stdout
    assert "onnx cascade / full" in speed.stdout and "exported cascade against the cascade (batch 256): " in speed.stdout
    resized = run_command([REPO_ROOT / "benchmarks" / "check_resize.py", "--models", models, "--data", small_data_dir,
                           "--n", "10"], cwd=tmp_path)
    assert resized.returncode == 0, resized.stderr
    assert "full trunk: 10 test images; largest probability difference" in resized.stdout and "cascade: " in resized.stdout
