"""Memory flat in model size: the streamed write holds one parameter's task vectors, never a
model. Two Llamas of one width and different depth, each merged by ``fusion_bench`` in a fresh
process whose anonymous memory (``RssAnon``: what runs a machine out of memory; RSS also counts
the dropable file pages of the checkpoints) is sampled from outside every 5 ms."""

import pytest

from fusion_bench_ace.bench import llm

SHAPE = {"vocab_size": 2048, "hidden_size": 384, "intermediate_size": 1536,
         "num_attention_heads": 6, "num_key_value_heads": 2}


@pytest.mark.parametrize("method", ["ace_llama", "ties_merging_nan"])
def test_anonymous_memory_does_not_grow_with_the_model(tmp_path, method):
    settings = {**llm.load_settings(), "method": method, "dtype": "bfloat16",
                "max_shard_size": "50MB"}
    peaks, sizes = {}, {}
    for layers in (2, 14):
        spec = {**SHAPE, "num_hidden_layers": layers}
        root = tmp_path / f"layers_{layers}"
        paths = llm.write_synthetic_pool(root / "pool", spec, 3, settings)
        row = llm.run_stream(paths, settings, root)
        peaks[layers] = row["merge_peak_anon_mib"] - row["merge_start_anon_mib"]
        sizes[layers] = sum(llm._numel(s) for s in llm.state_shapes(spec).values()) * 4 / 2**20
    grown = sizes[14] - sizes[2]  # the float32 model grew by ~100 MiB
    assert grown > 90
    assert peaks[14] - peaks[2] < 0.15 * grown, (peaks, sizes)
