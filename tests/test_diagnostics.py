"""ACE's diagnostics: γ and branch per layer, spectra of W_pre vs the final merge, their plots."""

import json

import torch
from fusion_bench import BaseModelPool
from torch import nn

from fusion_bench_ace import ACEMerging
from fusion_bench_ace.compare.__main__ import main as compare_main
from fusion_bench_ace.methods.ace import ace_merge_layer_with_info


def test_spectra_are_recorded_for_the_chosen_layers_and_plotted(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 8))
    experts = {}
    for i, scale in enumerate([1e-1, 1e-3, 1e-2]):  # energies spread: heterogeneous branch
        expert = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 8))
        expert.load_state_dict(
            {k: v + scale * torch.randn_like(v) for k, v in base.state_dict().items()}
        )
        experts[f"e{i}"] = expert
    # before the run: it loads the merge into the pool's (in-memory) pretrained model
    task_vectors = torch.stack(
        [e.state_dict()["1.weight"] - base.state_dict()["1.weight"] for e in experts.values()]
    )
    algorithm = ACEMerging(eps=1e-5, spectrum_keys=[r"1\.weight"])
    algorithm.run(BaseModelPool({"_pretrained_": base, **experts}))

    rows = {row["name"]: row for row in algorithm.layer_info}
    assert set(rows) == {"0.weight", "1.weight"}
    assert "singular_values" not in rows["0.weight"]
    recorded = rows["1.weight"]
    assert recorded["heterogeneous"] and recorded["rank_k"] == 2  # floor(0.3 * 8)

    # the recorded spectra are those of W_pre and of the merge the core returns
    info = ace_merge_layer_with_info(task_vectors, 1e-5, keep_preliminary=True)
    for key, matrix in (("preliminary", info.preliminary), ("merged", info.merged)):
        want = torch.linalg.svdvals(matrix.double())
        torch.testing.assert_close(
            torch.tensor(recorded["singular_values"][key], dtype=torch.float64),
            want,
            rtol=1e-5,
            atol=1e-9,
        )
    # the refinement adds sigma_bar * U_k V_k^T: the top-k singular values change, W_pre's do not
    # vanish
    assert recorded["singular_values"]["merged"][0] > recorded["singular_values"]["preliminary"][0]

    path = tmp_path / "ace_diagnostics.json"
    path.write_text(
        json.dumps({"eps": 1e-5, "tau": 0.3, "k_frac": 0.3, "layers": algorithm.layer_info})
    )
    assert compare_main(["diagnostics", str(path), "--out", str(tmp_path / "plots")]) == 0
    written = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert written == ["diagnostics.md", "gamma.png", "spectra.png"]
    summary = (tmp_path / "plots" / "diagnostics.md").read_text()
    heterogeneous = sum(row["heterogeneous"] for row in algorithm.layer_info)
    assert f"{heterogeneous} of 2 matrices took the heterogeneous branch" in summary
    assert "| 1.weight | 8x10 |" in summary


def test_scale_free_runs_are_summarised_with_their_own_statistic_and_threshold(tmp_path):
    layers = [{"name": f"l{i}", "shape": [4, 3], "gamma": g, "heterogeneous": g > 0.693,
               "rank_k": 0, "fallback": None} for i, g in enumerate([0.2, 1.5])]
    path = tmp_path / "ace_diagnostics.json"
    path.write_text(json.dumps({"eps": 1e-5, "tau": 0.3, "k_frac": 0.3, "eps_mode": "relative",
                                "eps_rel": 0.01, "gamma_mode": "scale_free",
                                "tau_scale_free": 0.693, "layers": layers}))
    assert compare_main(["diagnostics", str(path), "--out", str(tmp_path / "plots")]) == 0
    summary = (tmp_path / "plots" / "diagnostics.md").read_text()
    assert "eps_rel=0.01 (relative), tau_scale_free=0.693" in summary
    assert "1 of 2 matrices took the heterogeneous branch (Var[log e] > tau_scale_free)" in summary
    assert "| layer | shape | Var[log e] | branch |" in summary
