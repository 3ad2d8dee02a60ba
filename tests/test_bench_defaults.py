"""scripts/bench_defaults.py: runs `glad fit` + `glad eval` as a user would and tabulates what it measured."""

import json

from conftest import load_script, make_category


def test_bench_defaults_runs_fit_and_eval_and_prints_the_table(tmp_path, capsys):
  bench = load_script("bench_defaults")
  assert bench.setting_flags("default") == [] and bench.setting_flags("50000") == ["--max-samples", "50000"]
  cat = make_category(tmp_path / "cat", n_train=6, n_good=2, n_bad=2)
  out = tmp_path / "runs"
  fit_args = "--backbone resnet_tiny --image-size 64 --k 4 --max-iter 5"
  assert bench.main(["--categories", str(cat), "--settings", "default,300", "--out", str(out),
                     "--fit-args", fit_args, "--budget", "1e6"]) == 0
  rows = json.loads((out / "bench_defaults.json").read_text())
  assert [r["setting"] for r in rows] == ["default", "300"]
  for r in rows:
    assert r["fit_s"] > 0 and 0.0 <= r["image_auroc"] <= 1.0 and 0.0 <= r["pixel_auroc"] <= 1.0
    assert set(r["layers"]) == {"layer1", "layer2", "layer3"}
    assert all(l["radius"] in (1.0, 2.0, 3.0) for l in r["layers"].values())  # radius="auto"'s choice
  capped = rows[1]["layers"]["layer1"]
  assert capped["n_used"] == 300 < capped["n_vectors"] and capped["reason"] == "max_samples cap"
  assert "plan layer1" in (out / "cat" / "300" / "fit.log").read_text()   # the plain progress lines
  table = capsys.readouterr().out
  assert "| cat | default |" in table and "| cat | 300 |" in table and "| yes |" in table
